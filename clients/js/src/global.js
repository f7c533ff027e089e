// Entry of the classic build (dist/tidings.js, served at /static/tidings.js): the ES module's exports
// as globals — globalThis.Tidings (also TidingsClient) and TidingsError — and, under require(),
// module.exports = Tidings (which also has .Tidings, .TidingsError, .default): that line is build.mjs's
// footer, outside the bundle's function, where `module` is CommonJS's own.
import { Tidings } from "./index.js";

const root = typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : {};
// Loaded twice (two <script> tags): keep the first definition so that `instanceof` keeps working.
const T = root.Tidings && root.Tidings.PROTOCOL_VERSION ? root.Tidings : Tidings;
root.Tidings = T;
root.TidingsClient = T;
root.TidingsError = T.Error;
