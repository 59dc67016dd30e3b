// An Express backend for tests/bypass_matrix.rs. Express's defaults: case-insensitive,
// non-strict routing (a trailing slash matches), the extended (qs) query parser, params
// decoded with decodeURIComponent. The `method-override` package reads the three override
// headers and `_method` from the query or a urlencoded body, on POST only (its default).
// Prints "LISTENING <port>" once bound to 127.0.0.1:0.
'use strict';
const express = require('express');
const methodOverride = require('method-override');

const app = express();
let seen = [];
const BUY_METHODS = ['post', 'put', 'patch', 'delete'];

app.use(express.urlencoded({ extended: true }));
app.use(express.json());
for (const h of ['X-HTTP-Method-Override', 'X-HTTP-Method', 'X-Method-Override']) {
  app.use(methodOverride(h));
}
app.use(methodOverride((req) => (req.query ? req.query._method : undefined)));
app.use(
  methodOverride((req) => {
    if (req.body && typeof req.body === 'object' && '_method' in req.body) {
      const m = req.body._method;
      delete req.body._method;
      return m;
    }
    return undefined;
  })
);

const text = (v) => (v === undefined || v === null ? null : typeof v === 'string' ? v : JSON.stringify(v));
const qty = (v) => {
  if (v === undefined || v === null) return null;
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : JSON.stringify(v);
  if (typeof v === 'string') {
    const n = parseInt(v, 10);
    return Number.isNaN(n) ? v : String(n);
  }
  return JSON.stringify(v);
};

function record(route, req, sku, quantity) {
  seen.push({
    route,
    method: req.method,
    reservation: req.headers['x-flashgate-reservation'] ?? null,
    x_sku: req.headers['x-flashgate-sku'] ?? null,
    x_qty: req.headers['x-flashgate-quantity'] ?? null,
    sku: text(sku),
    qty: qty(quantity),
  });
}

function route(path, name, read) {
  const r = app.route(path);
  for (const m of BUY_METHODS) {
    r[m]((req, res) => {
      const [sku, quantity] = read(req);
      record(name, req, sku, quantity);
      res.json({ bought: true });
    });
  }
}

route('/api/flash/:sku/buy', 'path', (req) => [req.params.sku, undefined]);
route('/api/flash-q/buy', 'query', (req) => [req.query.sku, req.query.quantity]);
route('/api/flash-h/buy', 'header', (req) => [req.get('X-Sku'), req.get('X-Qty')]);
route('/api/flash-j/buy', 'json', (req) =>
  req.body && typeof req.body === 'object' ? [req.body.sku, req.body.quantity] : [undefined, undefined]
);

app.get('/__seen', (req, res) => {
  const out = seen;
  seen = [];
  res.json(out);
});

app.use((req, res) => res.status(404).send('not found'));
// A body the parsers refuse is a 400 that records nothing.
app.use((err, req, res, _next) => res.status(err.status || 400).send('bad request'));

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
