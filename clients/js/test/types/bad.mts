// Wrong calls: tsc --strict must report an error on each line marked "error" (the test checks).
import { Tidings } from "tidings-client";

const client = new Tidings({ url: "ws://localhost:8888/ws" });
client.publish(); // error: no channel
client.on("gap", (e) => e.nope); // error: GapEvent has no `nope`
client.on("no-such-event", () => {}); // error: unknown event
client.subscribe(42, () => {}); // error: channel is a string
client.publish("c", 1, { idempotencyKey: 7 }); // error: the key is a string
new Tidings({ timeout: "10s" }); // error: timeout is a number
client.subscribe("c", () => {}, { getToken: (channel: number) => "t" }); // error: getToken(channel: string)
client.on("disconnect", (e) => e.code.toUpperCase()); // error: code is a number
