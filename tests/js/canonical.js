// The reference for tests/test_canonical_json.py: what NOWPayments'
// JavaScript signs for an IPN body, in both forms of sortObject in use.
//
// Protocol: each stdin line is one JSON string holding a raw body. Each
// stdout line answers it with a JSON array: [documented form, arrays kept],
// or {"error": message} when the body does not parse. The outer layer is
// JSON so that newlines, U+2028 and lone surrogates in a body survive the
// trip in both directions.
"use strict";

const readline = require("node:readline");

// The documented sortObject: Object.keys() of an array gives "0", "1", ...,
// so arrays come out as objects keyed by their indices.
function sortArraysAsObjects(obj) {
  return Object.keys(obj)
    .sort()
    .reduce((sorted, key) => {
      const value = obj[key];
      sorted[key] =
        value && typeof value === "object" ? sortArraysAsObjects(value) : value;
      return sorted;
    }, {});
}

// The other form in use: arrays stay arrays, objects are sorted the same way
// (assigned into a fresh {}, so "__proto__" behaves as it does above).
function sortKeepingArrays(value) {
  if (Array.isArray(value)) {
    return value.map(sortKeepingArrays);
  }
  if (value === null || typeof value !== "object") {
    return value;
  }
  return Object.keys(value)
    .sort()
    .reduce((sorted, key) => {
      sorted[key] = sortKeepingArrays(value[key]);
      return sorted;
    }, {});
}

function answer(line) {
  try {
    const body = JSON.parse(line);
    const payload = JSON.parse(body);
    return [
      JSON.stringify(sortArraysAsObjects(payload)),
      JSON.stringify(sortKeepingArrays(payload)),
    ];
  } catch (error) {
    return { error: String(error) };
  }
}

const lines = readline.createInterface({ input: process.stdin, terminal: false });
lines.on("line", (line) => {
  process.stdout.write(JSON.stringify(answer(line)) + "\n");
});
