// Build every output of the package from the one source, src/index.js:
//   dist/index.mjs      ES module, sets no globals            (package "import", /static/tidings.mjs)
//   dist/index.cjs      CommonJS                              (package "require")
//   dist/tidings.js     classic script: globalThis.Tidings, also module.exports under require()
//                                                             (/static/tidings.js: the chat page)
//   dist/tidings.min.js the classic script, minified
//   dist/index.d.mts    index.d.ts for ES-module TypeScript users (same declarations)
// and copy dist/tidings.js and dist/index.mjs to the server's static files, which are committed so
// that a pip install needs no npm (tests/test_js_package.py checks they are this build's output).
//
//   node build.mjs                  build dist/ and copy to src/tidings/web/static/
//   node build.mjs --no-copy        build dist/ only
//   node build.mjs --outdir DIR     build into DIR only (no copy)
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = JSON.parse(readFileSync(join(here, "package.json"), "utf8"));
const args = process.argv.slice(2);
const outIdx = args.indexOf("--outdir");
const outdir = outIdx >= 0 ? resolve(args[outIdx + 1]) : join(here, "dist");
const copy = outIdx < 0 && !args.includes("--no-copy");
const STATIC = join(here, "..", "..", "src", "tidings", "web", "static");

const banner = `/*! tidings-client ${pkg.version} — client for the tidings server (WebSocket protocol v1). MIT.
 * Built from clients/js/src/index.js by clients/js/build.mjs: do not edit. API: docs/js-client.md */`;

const common = {
  absWorkingDir: here, // paths in the output's comments are relative to this, whatever the outdir
  bundle: true,
  target: "es2019",
  charset: "utf8",
  legalComments: "none",
  banner: { js: banner },
  define: { __TIDINGS_VERSION__: JSON.stringify(pkg.version) },
  logLevel: "warning",
};
// The classic build under require(): outside the bundle's function, so `module` is CommonJS's own.
const classic = {
  ...common,
  entryPoints: ["src/global.js"],
  format: "iife",
  footer: { js: 'if (typeof module === "object" && module && module.exports) module.exports = globalThis.Tidings;' },
};

mkdirSync(outdir, { recursive: true });
await Promise.all([
  build({ ...common, entryPoints: ["src/index.js"], format: "esm", outfile: join(outdir, "index.mjs") }),
  build({ ...common, entryPoints: ["src/index.js"], format: "cjs", outfile: join(outdir, "index.cjs") }),
  build({ ...classic, outfile: join(outdir, "tidings.js") }),
  build({ ...classic, minify: true, outfile: join(outdir, "tidings.min.js") }),
]);
copyFileSync(join(here, "index.d.ts"), join(outdir, "index.d.mts"));
if (copy) {
  copyFileSync(join(outdir, "tidings.js"), join(STATIC, "tidings.js"));
  copyFileSync(join(outdir, "index.mjs"), join(STATIC, "tidings.mjs"));
}
