'use strict';

// A cluster member on the Node.js package cluster-client, driven by the Go
// tests (interop_test.go) exactly as they drive a Go child process
// (childMain in proc_test.go): the spec comes in the environment variable
// CLUSTERCLIENT_TEST_CHILD, commands come on stdin and replies and events go
// to stdout, one JSON object per line. Logs go to stderr.
//
// The real client has the methods of the Go tests' real client (echo, pid,
// fail, sleep, push, published, subscribes, active) plus note, which
// records a call, and every app object is JSON (the transcode below), which
// is what a Go peer reads and writes.

const EventEmitter = require('events');
const readline = require('readline');
const cluster = require('cluster-client');

const spec = JSON.parse(process.env.CLUSTERCLIENT_TEST_CHILD || '{}');

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function log(level) {
  return (...args) => {
    const text = args.map(a => (a instanceof Error ? a.stack : typeof a === 'string' ? a : JSON.stringify(a))).join(' ');
    process.stderr.write(`[node ${process.pid} ${level}] ${text}\n`);
  };
}
const logger = { debug() {}, info: log('info'), warn: log('warn'), error: log('error') };

const transcode = {
  encode: obj => Buffer.from(JSON.stringify(obj)),
  decode: buf => JSON.parse(buf),
};

// formatKey as the reference's default, for a real client's own maps.
const keyOf = reg => JSON.stringify(reg);

class RealClient extends EventEmitter {
  constructor() {
    super();
    // INTEROP_READY_ERROR makes the real client fail to get ready with
    // an error of that code, as a leader's register answer carries it.
    if (process.env.INTEROP_READY_ERROR) {
      this.ready = cb => {
        const err = new Error('real client failed to start');
        err.name = 'StartError';
        err.code = process.env.INTEROP_READY_ERROR;
        process.nextTick(() => cb(err));
      };
    }
    this.listenersByKey = new Map();
    this.subscribeCalls = new Map();
    this.publishedRegs = [];
    this.notes = [];
  }

  async echo(x) {
    return x;
  }

  async pid() {
    return process.pid;
  }

  // fail(code, name) rejects with an Error that has that code and, if
  // given, that name.
  async fail(code, name) {
    const err = new Error('failed on purpose');
    if (typeof name === 'string') err.name = name;
    if (code !== undefined && code !== null) err.code = code;
    throw err;
  }

  async sleep(ms) {
    await new Promise(resolve => setTimeout(resolve, ms));
    return ms;
  }

  async push(reg, value) {
    const fn = this.listenersByKey.get(keyOf(reg));
    if (!fn) return false;
    fn(value);
    return true;
  }

  // nothing resolves to undefined, which the JSON transcode cannot
  // encode: the reference leader then sends no answer.
  async nothing() {
    return undefined;
  }

  async published() {
    return this.publishedRegs;
  }

  async subscribes(reg) {
    return this.subscribeCalls.get(keyOf(reg)) || 0;
  }

  async active(reg) {
    return this.listenersByKey.has(keyOf(reg));
  }

  // note records its argument; the tests call it oneway.
  async note(x) {
    this.notes.push(x);
    out({ event: 'note', value: x === undefined ? null : x });
    return true;
  }

  subscribe(reg, listener) {
    const key = keyOf(reg);
    this.subscribeCalls.set(key, (this.subscribeCalls.get(key) || 0) + 1);
    this.listenersByKey.set(key, listener);
  }

  unSubscribe(reg) {
    this.listenersByKey.delete(keyOf(reg));
  }

  publish(reg) {
    this.publishedRegs.push(reg);
    out({ event: 'published', reg });
  }

  close() {
    out({ event: 'realclosed' });
  }
}
const options = {
  name: spec.name || 'TestChannel',
  port: spec.port,
  transcode,
  logger,
  responseTimeout: spec.responseMS || 3000,
  heartbeatInterval: spec.heartbeatMS || 20000,
  maxWaitTime: spec.maxWaitMS || 10000,
  isBroadcast: !spec.noBroadcast,
  singleMode: !!spec.singleMode,
};
if (spec.role === 1) options.isLeader = true;
if (spec.role === 2) options.isLeader = false;

const client = cluster(RealClient, options).create();
const invokeSym = Symbol.for('ClusterClient#invoke');

client.on('error', err => {
  out({ event: 'nodeerror', name: err.name, message: err.message, code: err.code === undefined ? null : err.code });
});

function errorReply(err) {
  return {
    err: String(err && err.message),
    name: err && err.name,
    message: err && err.message,
    code: err && err.code !== undefined ? err.code : null,
    stack: err && err.stack,
  };
}

if (!spec.noWaitForReady) {
  client.ready().then(
    () => out({ event: 'ready', leader: !!client.isClusterClientLeader, pid: process.pid }),
    err => out({ event: 'error', err: String(err && err.message), name: err && err.name, code: err && err.code }));
}

const subs = new Map(); // reg JSON => listener

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', line => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    out({ event: 'error', err: err.message });
    return;
  }
  const reply = obj => out(Object.assign(obj, { id: cmd.id }));
  switch (cmd.op) {
    case 'invoke':
      client[invokeSym](cmd.method, cmd.args || [], (err, result) => {
        if (err) {
          reply(errorReply(err));
        } else {
          reply({ result: result === undefined ? null : result });
        }
      });
      break;
    case 'oneway':
      client[invokeSym](cmd.method, cmd.args || []);
      reply({ err: '' });
      break;
    case 'subscribe': {
      const key = keyOf(cmd.reg);
      const listener = value => out({ event: 'value', reg: cmd.reg, value: value === undefined ? null : value });
      subs.set(key, listener);
      client.subscribe(cmd.reg, listener);
      reply({ err: '' });
      break;
    }
    case 'unsubscribe': {
      const key = keyOf(cmd.reg);
      const listener = subs.get(key);
      if (listener) {
        client.unSubscribe(cmd.reg, listener);
        subs.delete(key);
      }
      reply({});
      break;
    }
    case 'publish':
      client.publish(cmd.reg);
      reply({ err: '' });
      break;
    case 'bench': {
      // n invokes of method with args, inflight of them at a time, for
      // the Go benchmarks' comparison with the reference; replies with
      // calls per second and the median round trip in microseconds.
      const n = cmd.n || 1;
      const inflight = cmd.inflight || 1;
      const lat = [];
      let started = 0;
      let finished = 0;
      let failed = null;
      const t0 = process.hrtime.bigint();
      const next = () => {
        started++;
        const s = process.hrtime.bigint();
        client[invokeSym](cmd.method, cmd.args || [], err => {
          lat.push(Number(process.hrtime.bigint() - s) / 1000);
          if (err && !failed) failed = err;
          finished++;
          if (finished === n) {
            const secs = Number(process.hrtime.bigint() - t0) / 1e9;
            lat.sort((a, b) => a - b);
            reply({ err: failed ? String(failed.message) : '', rate: n / secs, p50us: lat[Math.floor(n / 2)] });
          } else if (started < n) {
            next();
          }
        });
      };
      for (let i = 0; i < Math.min(inflight, n); i++) next();
      break;
    }
    case 'status':
      reply({ leader: !!client.isClusterClientLeader, pid: process.pid });
      break;
    case 'close':
      cluster.close(client).then(
        () => { reply({ err: '' }); process.exit(0); },
        err => { reply({ err: String(err && err.message) }); process.exit(0); });
      break;
    default:
      reply({ err: 'unknown op ' + cmd.op });
  }
});
rl.on('close', () => {
  cluster.close(client).then(() => process.exit(0), () => process.exit(0));
});
