// ES module entry point for tidings.js: `import { Tidings } from "/static/tidings.mjs";`
// tidings.js is a classic script (so it also works as a plain <script>); importing it for its side
// effect defines globalThis.Tidings, which this module re-exports. See docs/js-client.md.
import "./tidings.js";

export const Tidings = globalThis.Tidings;
export const TidingsClient = Tidings;
export const TidingsError = Tidings.Error;
export const PROTOCOL_VERSION = Tidings.PROTOCOL_VERSION;
export default Tidings;
