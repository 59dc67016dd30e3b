// flashgate live dashboard. Plain JS, no framework, no request but to this origin.
//
// The token: from `#token=…` (then removed from the address bar), else from this tab's
// sessionStorage, else from the form. The stream: GET /v1/events with `fetch()` and an
// Authorization header (EventSource cannot send one, and a token in a URL ends up in logs),
// read as server-sent events. A dropped or silent stream is retried with backoff; a refused
// token is not (each failure counts towards the admin API's lockout).
'use strict';

(() => {
  const KEY = 'flashgate.dashboard.token';
  const WINDOW = 120; // samples (seconds) in the chart
  const SILENT_MS = 5000; // no event for this long: reconnect (events come every second)
  const MAX_BACKOFF_MS = 15000;
  const OUTCOMES = [
    ['won', '#16a34a'], ['sold_out', '#dc2626'], ['already_purchased', '#9333ea'],
    ['rate_limited', '#f59e0b'], ['overloaded', '#ea580c'], ['unavailable', '#7f1d1d'],
    ['closed', '#6b7280'], ['not_configured', '#0891b2'], ['unauthenticated', '#db2777'],
    ['bad_request', '#a16207'], ['not_started', '#2563eb'], ['ended', '#1e3a8a'],
  ];

  const $ = (id) => document.getElementById(id);
  let token = null;
  let controller = null;
  let backoff = 1000;
  let retryTimer = null;
  let silentTimer = null;
  let samples = []; // [{t, rates}] for the chart
  let lastSnapshot = null;

  const store = {
    get() { try { return sessionStorage.getItem(KEY); } catch (_) { return null; } },
    set(t) { try { sessionStorage.setItem(KEY, t); } catch (_) { /* private mode */ } },
    clear() { try { sessionStorage.removeItem(KEY); } catch (_) { /* private mode */ } },
  };

  // The token in `#token=…`, removed from the address bar at once (and from history).
  function tokenFromFragment() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (!m) return null;
    history.replaceState(null, '', location.pathname + location.search);
    try { return decodeURIComponent(m[1]); } catch (_) { return m[1]; }
  }

  function setConn(kind, text) {
    const el = $('conn');
    el.className = 'conn ' + kind;
    el.textContent = text;
  }

  function askToken(message) {
    stop();
    token = null;
    $('live').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    const err = $('login-error');
    err.textContent = message || '';
    err.hidden = !message;
    setConn('off', 'not signed in');
    $('token').value = '';
    $('token').focus();
  }

  function stop() {
    clearTimeout(retryTimer);
    clearTimeout(silentTimer);
    if (controller) controller.abort();
    controller = null;
  }

  function start(t) {
    // An Authorization header carries printable ASCII; anything else never reaches flashgate.
    if (!/^[\x20-\x7e]+$/.test(t)) {
      store.clear();
      askToken('That is not a token: tokens are printable ASCII.');
      return;
    }
    token = t;
    $('login').hidden = true;
    $('logout').hidden = false;
    connect();
  }

  function retry(reason) {
    stop();
    const wait = Math.round(backoff * (0.8 + Math.random() * 0.4));
    backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    setConn('off', `disconnected (${reason}): retrying in ${Math.ceil(wait / 1000)} s`);
    retryTimer = setTimeout(connect, wait);
  }

  function armSilence(mine) {
    clearTimeout(silentTimer);
    silentTimer = setTimeout(() => { if (mine === controller) retry('no event for 5 s'); }, SILENT_MS);
  }

  async function reasonOf(resp) {
    try { const j = await resp.json(); return j.error || String(resp.status); } catch (_) { return String(resp.status); }
  }

  async function connect() {
    stop();
    const mine = new AbortController();
    controller = mine;
    setConn('connecting', 'connecting…');
    let resp;
    try {
      resp = await fetch('/v1/events', {
        headers: { Authorization: 'Bearer ' + token, Accept: 'text/event-stream' },
        cache: 'no-store', credentials: 'omit', signal: mine.signal,
      });
    } catch (_) {
      if (mine === controller) retry('cannot reach flashgate');
      return;
    }
    if (mine !== controller) return;
    if (resp.status === 401) {
      store.clear();
      askToken('Wrong token: flashgate refused it.');
      return;
    }
    if (resp.status === 429) {
      const wait = Number(resp.headers.get('Retry-After')) || 60;
      askToken(`Too many failed attempts from this address: wait ${wait} s, then sign in again.`);
      return;
    }
    if (!resp.ok || !resp.body) {
      retry(`${resp.status} ${await reasonOf(resp)}`);
      return;
    }
    store.set(token);
    backoff = 1000;
    setConn('live', 'live');
    $('live').hidden = false;
    armSilence(mine);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          if (onEvent(block)) armSilence(mine);
        }
        if (buf.length > (4 << 20)) break; // not an event stream
      }
    } catch (_) { /* aborted, or the connection dropped */ }
    if (mine === controller) retry('stream ended');
  }

  // One SSE block; true when it was a snapshot.
  function onEvent(block) {
    let type = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (type !== 'snapshot' || !data.length) return false;
    let snap;
    try { snap = JSON.parse(data.join('\n')); } catch (_) { return false; }
    render(snap);
    return true;
  }

  const fmtRate = (v) => (v === null || v === undefined) ? '–' : (v < 10 ? v.toFixed(1) : String(Math.round(v)));
  const fmtInt = (v) => (v === null || v === undefined) ? '–' : Number(v).toLocaleString('en');

  function render(snap) {
    lastSnapshot = snap;
    $('updated').textContent = 'updated ' + new Date(snap.time_ms).toLocaleTimeString();
    const breaker = $('breaker');
    breaker.textContent = snap.breaker_open ? 'OPEN' : 'closed';
    $('card-breaker').className = 'card ' + (snap.breaker_open ? 'bad' : 'good');
    $('in-flight').textContent = fmtInt(snap.in_flight);
    $('connections').textContent = fmtInt(snap.connections);
    const rates = snap.admissions_per_s || {};
    const answers = snap.answers_per_s || {};
    $('rate-won').textContent = fmtRate(rates.won);
    $('rate-429').textContent = fmtRate(answers['429']);
    $('rate-503').textContent = fmtRate(answers['503']);
    $('card-429').className = 'card' + (answers['429'] > 0 ? ' bad' : '');
    $('card-503').className = 'card' + (answers['503'] > 0 ? ' bad' : '');
    renderSkus(snap.skus || []);
    renderRooms(snap.rooms || []);
    if (snap.interval_s !== null && snap.interval_s !== undefined) {
      samples.push({ t: snap.time_ms, rates });
      if (samples.length > WINDOW) samples = samples.slice(-WINDOW);
    }
    renderLegend(rates, snap.admissions_total || {});
    drawChart();
  }

  function stateOf(s) {
    if (s.closed) return ['closed', 'closed'];
    if (s.stock === null || s.stock === undefined) return ['not configured', 'unconfigured'];
    if (s.stock === 0) return ['sold out', 'sold-out'];
    return ['open', 'open'];
  }

  const COLUMNS = ['sku', 'state', 'stock', 'sold', 'held', 'uncertain', 'released', 'added', 'bar-col'];

  function renderSkus(skus) {
    const body = document.querySelector('#skus tbody');
    $('no-skus').hidden = skus.length > 0;
    $('skus').hidden = skus.length === 0;
    const rows = new Map([...body.rows].map((r) => [r.dataset.sku, r]));
    skus.forEach((s, i) => {
      let row = rows.get(s.sku);
      if (!row) {
        row = document.createElement('tr');
        row.dataset.sku = s.sku;
        for (const c of COLUMNS) {
          const td = document.createElement('td');
          td.className = c + (['sku', 'state', 'bar-col'].includes(c) ? '' : ' num');
          row.appendChild(td);
        }
        const pill = document.createElement('span');
        row.cells[1].appendChild(pill);
        const bar = document.createElement('div');
        bar.className = 'bar';
        bar.appendChild(document.createElement('span'));
        row.cells[8].appendChild(bar);
      }
      rows.delete(s.sku);
      if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
      const u = s.units || {};
      const [label, cls] = stateOf(s);
      row.className = s.fresh ? '' : 'stale';
      row.title = s.fresh ? '' : 'the last read failed: last known values';
      row.cells[0].textContent = s.sku;
      const pill = row.cells[1].firstChild;
      pill.className = 'pill ' + cls;
      pill.textContent = label;
      row.cells[2].textContent = fmtInt(s.stock);
      row.cells[3].textContent = fmtInt(u.sold);
      row.cells[4].textContent = fmtInt(u.held);
      row.cells[5].textContent = fmtInt(u.uncertain);
      row.cells[5].classList.toggle('some', u.uncertain > 0);
      row.cells[6].textContent = fmtInt(u.released);
      row.cells[7].textContent = fmtInt(s.added);
      const left = s.added > 0 && s.stock !== null ? Math.min(1, s.stock / s.added) : 0;
      row.cells[8].firstChild.firstChild.style.width = (left * 100).toFixed(1) + '%';
    });
    for (const gone of rows.values()) gone.remove();
  }

  function renderRooms(rooms) {
    $('rooms-panel').hidden = rooms.length === 0;
    const body = document.querySelector('#rooms tbody');
    body.replaceChildren(...rooms.map((r) => {
      const row = document.createElement('tr');
      row.dataset.room = r.room;
      const wait = r.estimated_wait_s;
      const cells = r.error ? [r.room, 'unavailable', '–', '–', '–', '–'] : [
        r.room, r.mode, fmtInt(r.queued), fmtInt(r.active) + ' / ' + fmtInt(r.total_active),
        fmtInt(r.admitted_last_minute),
        wait === undefined ? '–' : (wait < 60 ? wait + ' s' : Math.ceil(wait / 60) + ' min'),
      ];
      cells.forEach((text, i) => {
        const td = document.createElement('td');
        if (i === 1) {
          const pill = document.createElement('span');
          pill.className = 'pill ' + (r.mode === 'open' ? 'open' : 'closed');
          pill.textContent = text;
          td.appendChild(pill);
        } else {
          td.textContent = text;
        }
        if (i >= 2) td.className = 'num';
        row.appendChild(td);
      });
      return row;
    }));
  }

  function renderLegend(rates, totals) {
    const ul = $('legend');
    if (!ul.children.length) {
      for (const [name, color] of OUTCOMES) {
        const li = document.createElement('li');
        li.dataset.outcome = name;
        const sw = document.createElement('span');
        sw.className = 'swatch';
        sw.style.background = color;
        const total = document.createElement('span');
        total.className = 'total';
        li.append(sw, document.createTextNode(name.replace(/_/g, ' ')), document.createElement('b'),
          document.createTextNode('/s ·'), total);
        ul.appendChild(li);
      }
    }
    for (const li of ul.children) {
      const name = li.dataset.outcome;
      li.querySelector('b').textContent = fmtRate(rates[name]);
      li.lastChild.textContent = fmtInt(totals[name] || 0) + ' total';
      li.classList.toggle('idle', !(totals[name] > 0));
    }
  }

  function drawChart() {
    const canvas = $('chart');
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
    if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
    const g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 44;
    const bottom = h - 20;
    const top = 8;
    const right = w - 8;
    let max = 1;
    for (const s of samples) for (const [name] of OUTCOMES) max = Math.max(max, s.rates[name] || 0);
    max = niceCeil(max);
    g.font = '11px system-ui, "DejaVu Sans", sans-serif';
    g.fillStyle = '#6b7280';
    g.strokeStyle = '#e5e7eb';
    g.lineWidth = 1;
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const y = bottom - (bottom - top) * (i / 4);
      g.beginPath(); g.moveTo(left, y + 0.5); g.lineTo(right, y + 0.5); g.stroke();
      g.fillText(fmtRate(max * i / 4), left - 6, y);
    }
    // The time axis grows with the data, from 30 s to the whole window.
    const span = Math.min(WINDOW, Math.max(30, samples.length));
    g.textAlign = 'left'; g.textBaseline = 'alphabetic';
    g.fillText(span >= 120 ? '−2 min' : `−${span} s`, left, h - 4);
    g.textAlign = 'right';
    g.fillText('now', right, h - 4);
    const x = (i) => right - (right - left) * ((samples.length - 1 - i) / (span - 1));
    const y = (v) => bottom - (bottom - top) * (v / max);
    g.lineWidth = 2;
    g.lineJoin = 'round';
    for (const [name, color] of OUTCOMES) {
      if (!samples.some((s) => s.rates[name] > 0)) continue;
      g.strokeStyle = color;
      g.beginPath();
      samples.forEach((s, i) => {
        const px = x(i);
        const py = y(s.rates[name] || 0);
        if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
      });
      g.stroke();
    }
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const t = $('token').value.trim();
      if (t) start(t);
    });
    $('logout').addEventListener('click', () => { store.clear(); askToken(''); });
    window.addEventListener('resize', drawChart);
    // A new `#token=…` pasted into the address bar of an open page.
    window.addEventListener('hashchange', () => { const t = tokenFromFragment(); if (t) start(t); });
    const t = tokenFromFragment() || store.get();
    if (t) start(t); else askToken('');
  });
})();
