// Call the splitspace frontend's /generate with the official JS client, as a Node user would.
//
//   node generate.mjs URL ['{"prompt": "a red fox", "width": 64, ...}']
//
// Parameters not given take the values below. SPLITSPACE_API_KEY, when set, is sent as
// `Authorization: Bearer <key>` (a machine client); otherwise the call is anonymous.
// Prints one line of JSON: {"image_url": ..., "info": {...}}. Exits 1 with the error on stderr.
import { Client } from "@gradio/client";

const [url, overrides] = process.argv.slice(2);
if (!url) {
  console.error("usage: node generate.mjs URL [JSON_PARAMS]");
  process.exit(2);
}

const params = {
  prompt: "a red fox",
  negative_prompt: "",
  width: 64,
  height: 64,
  steps: 1,
  guidance_scale: 0.0,
  seed: 42,
  ...(overrides ? JSON.parse(overrides) : {}),
};

const options = {};
if (process.env.SPLITSPACE_API_KEY) {
  options.headers = { Authorization: `Bearer ${process.env.SPLITSPACE_API_KEY}` };
}

try {
  const client = await Client.connect(url, options);
  const result = await client.predict("/generate", params);
  const [image, info] = result.data;
  console.log(JSON.stringify({ image_url: image?.url ?? null, info }));
  client.close?.();
  process.exit(0);
} catch (err) {
  console.error(err?.message ?? JSON.stringify(err));
  process.exit(1);
}
