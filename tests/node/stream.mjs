// Follow a streaming endpoint with the official JS client, as a Node user would.
//
//   node stream.mjs URL /ENDPOINT '[ARGS...]'
//
// Prints one line of JSON per message: {"stage": "data", "at": <arrival, epoch seconds>, "data": [...]}
// for each output as it arrives (the last one twice: once as it is made, once with the call's completion,
// as Gradio's protocol sends it), then {"stage": "complete"}. Exits 1 with the error on stderr.
// SPLITSPACE_API_KEY, when set, is sent as `Authorization: Bearer <key>`.
import { Client } from "@gradio/client";

const [url, endpoint, args] = process.argv.slice(2);
if (!url || !endpoint) {
  console.error("usage: node stream.mjs URL /ENDPOINT '[ARGS...]'");
  process.exit(2);
}
const options = {};
if (process.env.SPLITSPACE_API_KEY) {
  options.headers = { Authorization: `Bearer ${process.env.SPLITSPACE_API_KEY}` };
}

try {
  const client = await Client.connect(url, options);
  const job = client.submit(endpoint, args ? JSON.parse(args) : []);
  for await (const msg of job) {
    if (msg.type === "data") {
      console.log(JSON.stringify({ stage: "data", at: Date.now() / 1000, data: msg.data }));
    } else if (msg.type === "status" && msg.stage === "error") {
      throw new Error(msg.message ?? "error");
    } else if (msg.type === "status" && msg.stage === "complete") {
      break;
    }
  }
  console.log(JSON.stringify({ stage: "complete", at: Date.now() / 1000 }));
  client.close?.();
  process.exit(0);
} catch (err) {
  console.error(err?.message ?? JSON.stringify(err));
  process.exit(1);
}
