// A Node service's side of bridge jobs on RabbitMQ (avsc, amqplib), as docs/envelope.md says:
//
//   node main.mjs fingerprints --schemas DIRS
//       prints "FULL_NAME FINGERPRINT" (CRC-64-AVRO of the Parsing Canonical Form, 16 hex digits)
//   node main.mjs enqueue --schemas DIRS --url URL --prefix P --queue Q --n N --text T [--key K]
//       publishes one test.Echo job to the exchange <prefix>.jobs, routed by the queue's name,
//       persistent, mandatory and confirmed; prints its id
//   node main.mjs read --schemas DIRS --url URL --queue Q
//       takes one job from queue Q (basic.get, acknowledged), decodes the envelope and the
//       test.Echo payload inside, and prints them as one JSON line
//
// Both bodies are Avro's single-object encoding: C3 01, the schema's fingerprint (8 bytes,
// little-endian), the Avro binary body. The payload field holds the payload so framed.
import { readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import avro from "avsc";
import amqp from "amqplib";

const NAMES = ["bridge.JobError", "bridge.JobEnvelope", "bridge.DeadLetter", "test.Echo"];
const MAGIC = Buffer.from([0xc3, 0x01]);

// Parse the named schemas from <name>.avsc in the first of `dirs` that has it, in this order:
// a schema may name only types parsed before it (bridge.JobEnvelope names bridge.JobError).
function load(dirs) {
  const registry = {};
  const types = {};
  for (const name of NAMES) {
    const dir = dirs.find((d) => existsSync(join(d, `${name}.avsc`)));
    if (dir === undefined) throw new Error(`no ${name}.avsc in ${dirs.join(", ")}`);
    const schema = JSON.parse(readFileSync(join(dir, `${name}.avsc`), "utf8"));
    types[name] = avro.Type.forSchema(schema, { registry });
  }
  return types;
}

// CRC-64-AVRO, as the Avro specification gives it, on 64-bit unsigned BigInts.
const EMPTY = 0xc15d213aa4d7a795n;
const TABLE = Array.from({ length: 256 }, (_, i) => {
  let fp = BigInt(i);
  for (let j = 0; j < 8; j++) fp = (fp >> 1n) ^ (EMPTY & -(fp & 1n));
  return fp & 0xffffffffffffffffn;
});
function fingerprint(type) {
  let fp = EMPTY;
  // schema() with no options is the Parsing Canonical Form (toString() is a named type's name)
  for (const byte of Buffer.from(JSON.stringify(type.schema()), "utf8")) {
    fp = (fp >> 8n) ^ TABLE[Number((fp ^ BigInt(byte)) & 0xffn)];
  }
  return fp;
}

function frame(type, value) {
  const header = Buffer.alloc(8);
  header.writeBigUInt64LE(fingerprint(type));
  return Buffer.concat([MAGIC, header, type.toBuffer(value)]);
}

function unframe(types, bytes) {
  if (bytes.length < 10 || !bytes.subarray(0, 2).equals(MAGIC)) throw new Error("not single-object encoded");
  const fp = bytes.readBigUInt64LE(2);
  const type = Object.values(types).find((t) => fingerprint(t) === fp);
  if (type === undefined) throw new Error(`unknown schema fingerprint ${fp.toString(16)}`);
  return [type, type.fromBuffer(bytes.subarray(10))];
}

// A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, version 7, random bits, variant 10.
function uuid7(ms) {
  const bytes = randomBytes(16);
  bytes.writeUIntBE(ms, 0, 6);
  bytes[6] = 0x70 | (bytes[6] & 0x0f);
  bytes[8] = 0x80 | (bytes[8] & 0x3f);
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

async function enqueue(types, args) {
  const now = Date.now();
  const payload = frame(types["test.Echo"], { n: Number(args.n), text: args.text, sleep_ms: 0 });
  const envelope = {
    id: uuid7(now), type: "test.Echo", payload, queue: args.queue, key: args.key ?? null,
    idempotency_key: null, attempt: 1, max_attempts: null, created_at: now, run_at: null,
    expires_at: null, headers: { producer: "node" }, origin: "interop-node", errors: [], replays: 0,
  };
  const body = frame(types["bridge.JobEnvelope"], envelope);
  const connection = await amqp.connect(args.url);
  // amqplib emits 'error' when RabbitMQ closes the connection or a channel (publishing to a
  // missing exchange closes the channel: 404). Unheard, that is an uncaught exception, past the
  // catch that prints "enqueue: ..." and the close below; heard, it fails the publish. (Before
  // the publish, a closed connection fails createConfirmChannel by itself.)
  let fail = () => {};
  connection.on("error", (error) => fail(error));
  try {
    const channel = await connection.createConfirmChannel();
    channel.on("error", (error) => fail(error));
    let returned = null;
    channel.on("return", (message) => { returned = message.fields.replyText; });
    await new Promise((resolve, reject) => {
      fail = reject;
      channel.publish(`${args.prefix}.jobs`, args.queue, body, { persistent: true, mandatory: true },
        (error) => (error ? reject(error) : resolve()));
    });
    // A returned message comes before its confirm: RabbitMQ took it, but no queue did.
    if (returned !== null) throw new Error(`no queue "${args.queue}" is bound to ${args.prefix}.jobs: ${returned}`);
    console.log(envelope.id);
  } finally {
    await connection.close();
  }
}

async function read(types, args) {
  const connection = await amqp.connect(args.url);
  try {
    const channel = await connection.createChannel();
    const message = await channel.get(args.queue);
    if (message === false) throw new Error(`queue ${args.queue} is empty`);
    const [type, envelope] = unframe(types, message.content);
    if (type !== types["bridge.JobEnvelope"]) throw new Error(`not a job envelope: ${type.name}`);
    const [, payload] = unframe(types, envelope.payload);
    channel.ack(message);
    const { id, queue, key, attempt, headers, created_at: createdAt } = envelope;
    console.log(JSON.stringify({ id, type: envelope.type, queue, key, attempt, headers, createdAt, payload }));
  } finally {
    await connection.close();
  }
}

const { positionals: [command], values: args } = parseArgs({
  allowPositionals: true,
  options: Object.fromEntries(
    ["schemas", "url", "prefix", "queue", "n", "text", "key"].map((name) => [name, { type: "string" }]),
  ),
});
const types = load((args.schemas ?? "").split(","));
try {
  if (command === "fingerprints") {
    for (const name of NAMES) console.log(`${name} ${fingerprint(types[name]).toString(16).padStart(16, "0")}`);
  } else if (command === "enqueue") {
    await enqueue(types, { prefix: "bridge", n: "0", text: "", ...args });
  } else if (command === "read") {
    await read(types, args);
  } else {
    throw new Error(`unknown command ${command}: use fingerprints, enqueue or read`);
  }
} catch (error) {
  console.error(`${command}: ${error.message}`);
  process.exit(1);
}
