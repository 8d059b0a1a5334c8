/*! leadwerk.js - first-party tracking for Leadwerk ingest (ES2017, no dependencies).
 * <script async src="https://<ingest>/sdk.js" data-write-key="..."></script>, or before it:
 *   window.leadwerk = window.leadwerk || [];
 *   leadwerk.push(['init', {writeKey, host, consentRequired, autoPage}]);
 *   leadwerk.push(['track', 'Signed Up', {plan: 'pro'}]);
 * Queued calls replay in order after load ('init' first, then the automatic page view).
 * API: page(name?, props?) track(event, props?) identify(userId?, traits?) reset()
 *      consent(granted) init(options) push([method, ...args]) anonymousId()
 * Privacy: with Do-Not-Track or Global Privacy Control nothing is sent or stored, ever.
 * With consentRequired, calls before consent(true) are DROPPED (not queued): no cookie, no
 * localStorage, no ids, no requests. consent(true) stores lw_consent=granted and sends the
 * automatic page view; consent(false) deletes the ids and stores lw_consent=denied.
 * Forms: <form data-leadwerk-form="<id>"> gets hidden message_id, page_url and (when allowed)
 * anonymous_id/user_id inputs on submit and posts natively to <host>/f/<id>.
 */
(() => {
  'use strict';
  const VERSION = '1.0.0';
  const METHODS = ['init', 'page', 'track', 'identify', 'reset', 'consent'];
  const AID = 'lw_aid', UID = 'lw_uid', CONSENT = 'lw_consent';
  const w = window, d = document, nav = navigator, loc = location;
  try {
    const existing = w.leadwerk;
    if (existing && existing.VERSION) return; // loaded twice
    const script = d.currentScript || d.querySelector('script[src$="/sdk.js"]');
    const attr = (name) => (script ? script.getAttribute('data-' + name) : null);
    let origin = loc.origin;
    try { origin = new URL(script.src).origin; } catch (e) { /* inline: same origin */ }
    const cfg = {writeKey: attr('write-key') || '', host: attr('host') || origin,
      consentRequired: attr('consent-required') === 'true', autoPage: attr('auto-page') !== 'false'};
    const ids = {aid: null, uid: null};
    let consentState = null; // in-memory lw_consent, for when storage is blocked
    let booted = false;      // the automatic page view went out (once per page load)
    let pending = [];        // calls after load but before a write key is known

    const store = (k, v) => {
      try {
        const s = w.localStorage;
        if (v === undefined) return s.getItem(k);
        if (v === null) s.removeItem(k); else s.setItem(k, v);
      } catch (e) { /* storage blocked */ }
      return null;
    };
    const readCookie = () => {
      const m = d.cookie.match(/(?:^|;\s*)lw_aid=([^;]*)/);
      try { return m ? decodeURIComponent(m[1]) : null; } catch (e) { return null; }
    };
    const writeCookie = (value, maxAge) => {
      d.cookie = `${AID}=${encodeURIComponent(value)}; Max-Age=${maxAge}; Path=/; SameSite=Lax` +
        (loc.protocol === 'https:' ? '; Secure' : '');
    };
    const uuid = () => {
      const c = w.crypto;
      if (c && c.randomUUID) return c.randomUUID();
      const b = new Uint8Array(16);
      if (c && c.getRandomValues) c.getRandomValues(b);
      else for (let i = 0; i < 16; i++) b[i] = Math.random() * 256;
      b[6] = (b[6] & 0x0f) | 0x40;
      b[8] = (b[8] & 0x3f) | 0x80;
      const h = Array.from(b, (x) => (x + 0x100).toString(16).slice(1)).join('');
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    };

    const privacySignal = () => nav.doNotTrack === '1' || w.doNotTrack === '1' ||
      nav.msDoNotTrack === '1' || nav.globalPrivacyControl === true;
    // May anything identifying be stored or sent?
    const identifiable = () => {
      if (privacySignal()) return false;
      const c = consentState || store(CONSENT);
      return c !== 'denied' && (!cfg.consentRequired || c === 'granted');
    };
    const allowed = () => !!cfg.writeKey && identifiable();

    // Only called once identifiable(): this is what sets the cookie (refreshing its year).
    const anonymousId = () => {
      ids.aid = ids.aid || readCookie() || store(AID) || uuid();
      writeCookie(ids.aid, 31536000);
      store(AID, ids.aid);
      return ids.aid;
    };
    const userId = () => ids.uid || (ids.uid = store(UID));
    const clearIds = () => {
      ids.aid = ids.uid = null;
      writeCookie('', 0);
      store(AID, null);
      store(UID, null);
    };

    const url = () => loc.href.split('#')[0];
    const pageInfo = () => ({url: url(), path: loc.pathname, title: d.title,
      referrer: d.referrer, search: loc.search});
    const context = () => {
      const ctx = {page: pageInfo(), userAgent: nav.userAgent, locale: nav.language,
        library: {name: 'leadwerk.js', version: VERSION}};
      const q = new URLSearchParams(loc.search), campaign = {};
      ['source', 'medium', 'campaign', 'term', 'content'].forEach((k) => {
        const v = q.get('utm_' + k);
        if (v) campaign[k === 'campaign' ? 'name' : k] = v;
      });
      if (Object.keys(campaign).length) ctx.campaign = campaign;
      return ctx;
    };
    const isObject = (v) => !!v && typeof v === 'object' && !Array.isArray(v);

    const transmit = (endpoint, body) => {
      let queued = false;
      try {
        queued = !!nav.sendBeacon && nav.sendBeacon(endpoint, new Blob([body], {type: 'text/plain'}));
      } catch (e) { /* fall back to fetch */ }
      if (!queued && w.fetch) {
        w.fetch(endpoint, {method: 'POST', keepalive: true, body,
          headers: {'Content-Type': 'text/plain'}}).catch(() => { /* offline */ });
      }
    };
    const send = (type, fields) => {
      if (!allowed()) return;
      const now = new Date().toISOString();
      const msg = {type, messageId: uuid(), anonymousId: anonymousId(), timestamp: now,
        originalTimestamp: now, context: context()};
      const uid = userId();
      if (uid) msg.userId = uid;
      Object.assign(msg, fields, {sentAt: new Date().toISOString(), writeKey: cfg.writeKey});
      transmit(`${cfg.host}/v1/${type}`, JSON.stringify(msg));
    };
    const boot = () => {
      if (booted || !allowed()) return;
      booted = true;
      anonymousId();
      if (cfg.autoPage) impl.page();
    };

    const impl = {
      init(options) {
        if (!isObject(options)) return;
        ['writeKey', 'host', 'consentRequired', 'autoPage'].forEach((k) => {
          if (options[k] !== undefined) cfg[k] = options[k];
        });
        cfg.host = String(cfg.host || origin).replace(/\/+$/, '');
        if (!cfg.writeKey) return;
        const calls = pending;
        pending = [];
        boot();
        calls.forEach(dispatch);
      },
      page(name, properties) {
        if (isObject(name)) [name, properties] = [undefined, name];
        const props = Object.assign(pageInfo(), isObject(properties) ? properties : {});
        const fields = {properties: props};
        if (name) fields.name = props.name = String(name);
        send('page', fields);
      },
      track(event, properties) {
        if (event) send('track', {event: String(event), properties: isObject(properties) ? properties : {}});
      },
      identify(id, traits) {
        if (isObject(id)) [id, traits] = [null, id];
        if (!allowed()) return;
        if (id !== null && id !== undefined && id !== '') store(UID, ids.uid = String(id));
        send('identify', {traits: isObject(traits) ? traits : {}});
      },
      reset: clearIds, // the next call starts a fresh visitor id
      consent(granted) {
        consentState = granted ? 'granted' : 'denied';
        if (!granted) clearIds();
        if (privacySignal()) return; // DNT / GPC always win: store nothing
        store(CONSENT, consentState);
        if (granted) boot();
      }
    };

    const dispatch = (args) => {
      try {
        if (!args || typeof args.length !== 'number') return;
        const name = args[0], fn = impl[name];
        if (!fn) return;
        if (!cfg.writeKey && !['init', 'consent', 'reset'].includes(name)) {
          if (pending.length < 100) pending.push(args);
          return;
        }
        fn(...Array.prototype.slice.call(args, 1));
      } catch (e) { /* never throw into the host page */ }
    };

    const api = {VERSION, push: (args) => { dispatch(args); }};
    METHODS.forEach((m) => { api[m] = (...args) => dispatch([m, ...args]); });
    api.anonymousId = () => { try { return allowed() ? anonymousId() : null; } catch (e) { return null; } };

    d.addEventListener('submit', (event) => {
      try {
        const form = event.target, id = form && form.getAttribute && form.getAttribute('data-leadwerk-form');
        if (!id) return;
        if (!form.getAttribute('action')) {
          form.setAttribute('action', `${cfg.host}/f/${encodeURIComponent(id)}`);
          if (!form.getAttribute('method')) form.setAttribute('method', 'post');
        }
        const hidden = (name, value) => {
          let el = form.querySelector(`input[name="${name}"]`);
          if (!el) {
            el = Object.assign(d.createElement('input'), {type: 'hidden', name});
            el.setAttribute('data-leadwerk', '');
            form.appendChild(el);
          } else if (el.value && !el.hasAttribute('data-leadwerk')) {
            return; // the page set its own value
          }
          el.value = value;
        };
        hidden('message_id', uuid());
        hidden('page_url', url());
        if (!identifiable()) return; // no identifiers without consent / with DNT or GPC
        hidden('anonymous_id', anonymousId());
        const uid = userId();
        if (uid) hidden('user_id', uid);
      } catch (e) { /* never block the form */ }
    }, true);

    // Replace the queue; old references to the stub array keep working.
    const queue = Array.isArray(existing) ? existing.slice() : [];
    w.leadwerk = api;
    if (Array.isArray(existing)) {
      existing.length = 0;
      Object.assign(existing, api);
    }
    queue.filter((c) => c && c[0] === 'init').forEach(dispatch);
    impl.init({}); // normalise the host; boots when the script tag carried the write key
    queue.filter((c) => !c || c[0] !== 'init').forEach(dispatch);
  } catch (e) { /* never throw into the host page */ }
})();
