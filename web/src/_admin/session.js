// Who is logged in and what they may do (whoami's effective ACLs), plus the live event stream.
import { token } from "./api.js";

export const session = { me: null, acls: new Set() };
export const can = (acl) => session.acls.has(acl);
export const isSuper = () => session.me && (session.me.tenant_id === 0 || session.me.tenant_id === null);

const listeners = new Set();
export const onEvent = (fn) => (listeners.add(fn), () => listeners.delete(fn));
let source = null;

export function startEvents() {
  stopEvents();
  source = new EventSource(`/api/v1/events?token=${encodeURIComponent(token())}`);
  for (const type of ["created", "updated", "deleted", "state"]) {
    source.addEventListener(type, (e) => {
      let data;
      try {
        data = JSON.parse(e.data);
      } catch {
        return;
      }
      data.type = data.type || type;
      for (const fn of listeners) fn(data);
    });
  }
  source.onopen = () => document.body.classList.add("live");
  source.onerror = () => document.body.classList.remove("live");
}

export function stopEvents() {
  if (source) source.close();
  source = null;
  document.body.classList.remove("live");
}
