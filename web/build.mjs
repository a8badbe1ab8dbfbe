// Bundle every entry in src/ (portal.js, admin.js, spy.js, …) with its CSS into the Python package's static dir.
import { build } from "esbuild";
import { readdirSync } from "node:fs";

const entries = readdirSync("src").filter((f) => f.endsWith(".js") && !f.startsWith("_")).map((f) => `src/${f}`);
await build({
  entryPoints: entries,
  bundle: true,
  format: "esm",
  target: ["chrome110", "firefox110", "safari16"],
  minify: true,
  sourcemap: false,
  outdir: "../src/deckard/web/static/dist",
  loader: { ".css": "css", ".png": "file", ".svg": "file" },
  logLevel: "warning",
});
console.log(`built ${entries.length} bundles`);
