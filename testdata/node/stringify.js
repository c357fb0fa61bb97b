'use strict';

// Reads one JSON text per line on stdin and writes, per line, the JSON
// string of JSON.stringify(JSON.parse(text)), or {"error": message}: what
// a Node.js peer makes of a registration (interop_test.go).

const readline = require('readline');

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', line => {
  let out;
  try {
    out = JSON.stringify(JSON.stringify(JSON.parse(line)));
  } catch (err) {
    out = JSON.stringify({ error: err.message });
  }
  process.stdout.write(out + '\n');
});
