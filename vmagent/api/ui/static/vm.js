// A VM's page: status, events and snapshots follow the VM; the buttons run operations
// without a reload.
import {get, op, poll, swap} from './common.js';

const name = document.getElementById('status').dataset.vm;
const result = document.getElementById('result');
const parts = ['status', 'spec', 'events', 'snapshots'];

async function refresh() {
  const doc = await get(`/ui/api/vms/${encodeURIComponent(name)}`);
  for (const p of parts) swap(document.getElementById(p), doc.html[p]);
}

function say(text, kind) {
  result.textContent = text;
  result.className = `msg ${kind}`;
}

for (const form of document.querySelectorAll('form[data-op]')) {
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const action = form.dataset.op;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const params = {name};
    if (action === 'snapshot' && form.snapshot.value) params.snapshot = form.snapshot.value;
    const buttons = form.querySelectorAll('button');
    buttons.forEach((b) => { b.disabled = true; });
    say(`${action}…`, 'info');
    setTimeout(refresh, 300);
    try {
      const doc = await op(action, params);
      if (action === 'delete') { location.assign('/ui/'); return; }
      say(`${action}: done` + (doc && doc.method ? ` (${doc.method})` : ''), 'ok');
    } catch (e) {
      say(`${action}: ${e.message}`, 'error');
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      refresh();
    }
  });
}

poll(refresh, 1000);
