// Correct usage of the package's whole API: must compile with tsc --strict.
import Default, { Tidings, TidingsClient, TidingsError, PROTOCOL_VERSION, VERSION } from "tidings-client";
import type { GapEvent, Publication, PublishResult, SubscribeResult, TidingsOptions, UnsubscribedEvent, WebSocketConstructor } from "tidings-client";

declare const SomeWebSocket: WebSocketConstructor;

const options: TidingsOptions = {
  url: "wss://push.example.com/ws",
  getToken: async () => "jwt",
  minReconnectDelay: 250,
  maxReconnectDelay: 10000,
  timeout: 5000,
  publishDeadline: 20000,
  pingInterval: 0,
  reconnect: true,
  WebSocket: SomeWebSocket,
  debug: false,
};
const client: Tidings = new Tidings(options);
const other: Tidings = new Default("ws://localhost:8888/ws");
const same: typeof Tidings = TidingsClient;
const version: string = VERSION + Tidings.VERSION;
const protocol: 1 = PROTOCOL_VERSION;

interface Chat {
  body: string;
  nick: string;
}

async function main(): Promise<void> {
  client.connect().setToken("t");
  client.on("state", (state, previous) => {
    const s: "disconnected" | "connecting" | "connected" | "closed" = state;
    void [s, previous];
  });
  client.on("gap", (e: GapEvent) => {
    const channel: string = e.channel;
    const from: number | undefined = e.missing?.from;
    void [channel, from, e.reason === "epoch", e.position.offset];
  });
  const stop = client.on("unsubscribed", (e: UnsubscribedEvent) => void [e.channel, e.code, e.resubscribe]);
  stop();
  client.once("error", (err) => void [err.code, err.channel, err instanceof TidingsError]);
  client.on("connected", ({ client: id, version: v }) => void [id, v]);
  client.on("disconnect", ({ code, reason, reconnect }) => void [code + 1, reason, reconnect]);
  client.on("reconnecting", ({ attempt, delay }) => void (attempt + delay));
  client.on("subscribed", ({ channel, recovered }) => void [channel, recovered]);
  client.on("join", ({ user }) => void user);
  client.on("message", (pub: Publication) => void pub.offset);
  client.off("message");

  const sub: SubscribeResult = await client.subscribe<Chat>(
    "chat:lobby",
    (pub) => {
      const body: string = pub.data.body;
      void [body, pub.offset, pub.epoch, pub.time, pub.info?.user];
    },
    { since: { offset: 41, epoch: "d1f0" }, getToken: async (channel: string) => channel }
  );
  await client.subscribe("priv:x", { token: "jwt" });
  void [sub.offset, sub.ttl, sub.expires];
  const res: PublishResult = await client.publish("chat:lobby", { body: "hi", nick: "ann" }, { idempotencyKey: "k-1", timeout: 1000, deadline: 5000 });
  void [res.offset, res.epoch, res.id];
  const hist = await client.history<Chat>("chat:lobby", { limit: 10, since: client.position("chat:lobby") });
  void hist.publications.map((p) => p.data.nick);
  const who = await client.presence("chat:lobby");
  void who.clients.map((c) => c.client + c.user + who.count);
  await client.ping({ timeout: 1000 });
  await client.request("ping", {});
  await client.unsubscribe("chat:lobby");
  void [client.subscriptions(), client.state, client.clientId, client.url];
  try {
    await client.publish("x", null);
  } catch (e) {
    if (e instanceof TidingsError && e.code === "timeout") void e.idempotencyKey;
  }
  client.close();
}

void [main, other, same, version, protocol];
