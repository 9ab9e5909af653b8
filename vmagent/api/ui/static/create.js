// The create form: create through the agent, then follow the boot phases as
// `vmctl create` shows them (kernel started, SSH answers, cloud-init finished).
import {get, poll, postForm} from './common.js';

const form = document.getElementById('create');
const progress = document.getElementById('progress');
const line = document.getElementById('p-line');
const result = document.getElementById('p-result');

function syncSource() {
  const template = form.source.value === 'template';
  form.image.disabled = template;
  form.template.disabled = !template;
  for (const f of ['cpus', 'memory', 'disk']) form[f].disabled = template;
}
for (const r of form.querySelectorAll('input[name=source]')) r.addEventListener('change', syncSource);
syncSource();

function mark(key, value, t0) {
  const li = progress.querySelector(`li[data-phase="${key}"]`);
  if (!li || li.dataset.done) return;
  if (value === true || value === 'not seen') {
    li.dataset.done = '1';
    li.classList.add(value === true ? 'done' : 'skipped');
    li.querySelector('.mark').textContent = value === true ? '✓' : '–';
    li.querySelector('.t').textContent = value === true
      ? `${((Date.now() - t0) / 1000).toFixed(1)} s` : '(not seen on the console)';
  }
}

form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = form.name.value.trim();
  const t0 = Date.now();
  const button = document.getElementById('create-submit');
  button.disabled = true;
  progress.hidden = false;
  progress.scrollIntoView({block: 'nearest'});
  document.getElementById('p-name').textContent = name;
  for (const li of progress.querySelectorAll('li')) {
    delete li.dataset.done; li.className = '';
    li.querySelector('.mark').textContent = '·'; li.querySelector('.t').textContent = '';
  }
  result.textContent = 'creating…';
  result.className = 'info';
  let created = false, failed = false, stop = null;
  const creating = postForm('/ui/api/create', form).then(() => { created = true; })
    .catch((e) => {
      failed = true;
      result.textContent = `create failed: ${e.message}`;
      result.className = 'msg error';
      button.disabled = false;
      if (stop) stop();
    });
  let done = false;
  stop = poll(async () => {
    if (failed || done) return;
    let doc;
    try { doc = await get(`/ui/api/vms/${encodeURIComponent(name)}`); } catch (e) { return; }
    const ph = doc.phases;
    if (!created && !ph.qemu) return;
    for (const [key, value] of Object.entries(ph)) mark(key, value, t0);
    try {
      const log = await get(`/ui/api/op/console_log?name=${encodeURIComponent(name)}&tail=2048`);
      const lines = (log.data || '').split(/\r?\n/).map((s) => s.trim()).filter(Boolean);
      if (lines.length) line.textContent = lines[lines.length - 1];
    } catch (e) { /* the log comes with the VM */ }
    if (doc.status.state === 'broken') {
      result.textContent = `${name} is broken: ${doc.status.reason || 'qemu exited'}`;
      result.className = 'msg error';
      done = true;
      stop();
    } else if (created && ph.ssh && ph.cloud_init) {
      result.innerHTML = '';
      const a = document.createElement('a');
      a.href = `/ui/vms/${encodeURIComponent(name)}`;
      a.textContent = `${name} is ready`;
      const code = document.createElement('code');
      code.textContent = `vmctl ssh ${name}`;
      result.append(a, ': ', code);
      result.className = 'msg ok';
      button.disabled = false;
      done = true;
      stop();
    }
  }, 1000);
  await creating;
});
