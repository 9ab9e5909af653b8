// Shared by the UI's pages: calls to the agent with the page's CSRF token.
export const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || '';

export class AgentError extends Error {
  constructor(status, doc) {
    super(doc && doc.message ? doc.message : `HTTP ${status}`);
    this.status = status;
    this.code = doc && doc.error;
  }
}

async function answer(resp) {
  let doc = null;
  try { doc = await resp.json(); } catch (e) { doc = null; }
  if (!resp.ok) {
    if (resp.status === 401) { location.assign('/ui/login'); }
    throw new AgentError(resp.status, doc);
  }
  return doc;
}

// GET a JSON document of the UI (/ui/api/...)
export async function get(path) {
  return answer(await fetch(path, {credentials: 'same-origin',
                                   headers: {'Accept': 'application/json'}}));
}

// run an operation of the table that changes something (POST, CSRF token)
export async function op(name, params = {}) {
  return answer(await fetch(`/ui/api/op/${name}`, {
    method: 'POST', credentials: 'same-origin', body: JSON.stringify(params),
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf(),
              'Accept': 'application/json'}}));
}

export async function postForm(path, form) {
  return answer(await fetch(path, {
    method: 'POST', credentials: 'same-origin', body: new URLSearchParams(new FormData(form)),
    headers: {'X-CSRF-Token': csrf(), 'Accept': 'application/json'}}));
}

// replace an element's content with HTML the agent rendered, only when it changed
// (so focus and selection survive a poll that brought nothing new)
export function swap(el, html) {
  if (el && el.dataset.html !== html) {
    el.innerHTML = html;
    el.dataset.html = html;
  }
}

// call fn every ms milliseconds, never two at once; slower while the tab is hidden
export function poll(fn, ms) {
  let timer = null, stopped = false;
  const run = async () => {
    try { await fn(); } catch (e) { console.warn(e); }
    if (!stopped) timer = setTimeout(run, document.hidden ? ms * 5 : ms);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };   // also from inside fn
}

export function wsURL(path) {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${path}`;
}
