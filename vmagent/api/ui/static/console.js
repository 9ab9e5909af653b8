// The serial console in xterm.js: the recent console log first, then the live console
// (the same websocket console as `vmctl console`); what you type goes to the guest.
import {get, wsURL} from './common.js';

const el = document.getElementById('term');
const status = document.getElementById('term-status');
const name = el.dataset.vm;
const term = new window.Terminal({convertEol: false, scrollback: 5000, cursorBlink: true,
                                  fontFamily: 'monospace', fontSize: 14});
const fit = new window.FitAddon.FitAddon();
term.loadAddon(fit);
term.open(el);
fit.fit();
window.addEventListener('resize', () => fit.fit());
window.vmagentTerm = term;           // for tests and the curious: the terminal's buffer

async function start() {
  try {
    const log = await get(`/ui/api/op/console_log?name=${encodeURIComponent(name)}&tail=65536`);
    if (log.data) term.write(log.data);
  } catch (e) {
    term.write(`\r\n[the console log could not be read: ${e.message}]\r\n`);
  }
  const ws = new WebSocket(wsURL(`/ui/vms/${encodeURIComponent(name)}/console.ws`));
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => { status.textContent = 'connected'; term.focus(); };
  ws.onmessage = (ev) => term.write(typeof ev.data === 'string' ? ev.data
                                                                : new Uint8Array(ev.data));
  ws.onclose = (ev) => {
    status.textContent = ev.code >= 4000 ? `closed: ${ev.reason}` : 'disconnected';
  };
  term.onData((data) => { if (ws.readyState === WebSocket.OPEN) ws.send(data); });
}
start();
