// CommonJS usage (require) with the package's types: must compile with tsc --strict.
import tidings = require("tidings-client");

const client = new tidings.Tidings({ url: "ws://localhost:8888/ws" });
client.on("gap", (e) => void e.channel);
const err: tidings.TidingsError = new tidings.TidingsError("timeout");
const D: typeof tidings.Tidings = tidings.default;
void [client, err, D, tidings.VERSION];
