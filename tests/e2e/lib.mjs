// Shared helpers for the end-to-end tests: start `fanout` processes on
// free ports, wait for conditions, publish over HTTP.
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { EventSource } from "eventsource";

// The SDK needs a global EventSource outside browsers.
globalThis.EventSource = EventSource;

const here = path.dirname(fileURLToPath(import.meta.url));
export const FANOUT_BIN =
  process.env.FANOUT_BIN ?? path.resolve(here, "../../target/debug/fanout");

export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

/** Start a fanout node; resolves once /api/health answers. */
export async function startNode(env = {}) {
  const port = await freePort();
  const child = spawn(FANOUT_BIN, [], {
    env: { ...process.env, FANOUT_LISTEN: `127.0.0.1:${port}`, ...env },
    stdio: ["ignore", "ignore", "inherit"],
  });
  const base = `http://127.0.0.1:${port}`;
  await waitFor(async () => {
    try {
      return (await fetch(`${base}/api/health`)).ok;
    } catch {
      return false;
    }
  }, `node on ${port}`);
  return {
    base,
    port,
    child,
    async stop(signal = "SIGTERM") {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once("exit", r));
      child.kill(signal);
      await exited;
    },
  };
}

/** Poll `cond` until it is truthy; fail after `ms`. */
export async function waitFor(cond, what, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function publish(base, body, key) {
  const res = await fetch(`${base}/api/publish`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(key ? { authorization: `Bearer ${key}` } : {}),
    },
    body: JSON.stringify(body),
  });
  if (!res.ok) throw new Error(`publish ${res.status}: ${await res.text()}`);
  return res.json();
}
