// The VM's screen in noVNC (Debian's novnc package, served by the agent), over the
// agent's websocket bridge to the VM's VNC socket.
import RFB from '/ui/static/novnc/core/rfb.js';
import {wsURL} from './common.js';

const el = document.getElementById('screen');
const status = document.getElementById('vnc-status');
const name = el.dataset.vm;
const scale = document.getElementById('vnc-scale');
let rfb = null;

function connect() {
  rfb = new RFB(el, wsURL(`/ui/vms/${encodeURIComponent(name)}/vnc.ws`),
                {wsProtocols: ['binary']});
  rfb.scaleViewport = scale.checked;
  rfb.focusOnClick = true;
  rfb.addEventListener('connect', () => {
    status.textContent = 'connected';
    el.dataset.connected = String(Math.round(performance.now()));   // ms after navigation
  });
  rfb.addEventListener('disconnect', (ev) => {
    delete el.dataset.connected;
    status.textContent = ev.detail.clean ? 'disconnected' : 'connection lost';
  });
  rfb.addEventListener('desktopname', (ev) => { el.dataset.desktop = ev.detail.name; });
  window.vmagentRFB = rfb;
}

document.getElementById('vnc-cad').addEventListener('click', () => rfb && rfb.sendCtrlAltDel());
scale.addEventListener('change', () => { if (rfb) rfb.scaleViewport = scale.checked; });
connect();
