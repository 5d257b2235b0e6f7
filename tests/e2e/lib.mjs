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
export async function startNode(env = {}, fixedPort = undefined) {
  const port = fixedPort ?? (await freePort());
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
  const info = await (await fetch(`${base}/api/health`)).json();
  return {
    base,
    port,
    child,
    tag: info.data.node,
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

/** A private redis-server on a free port. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: "ignore" },
  );
  const url = `redis://127.0.0.1:${port}`;
  await waitFor(
    () =>
      new Promise((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => {
          s.end();
          resolve(true);
        });
        s.on("error", () => resolve(false));
      }),
    "redis-server",
  );
  return { port, url, stop: () => child.kill("SIGKILL") };
}

/**
 * nginx in front of `ports` with deploy/nginx/fanout.conf (round robin, no
 * stickiness), on a free port, in its own prefix directory.
 */
export async function startNginx(ports) {
  const { mkdtempSync, readFileSync, writeFileSync, mkdirSync } = await import("node:fs");
  const os = await import("node:os");
  const listen = await freePort();
  const dir = mkdtempSync(path.join(os.tmpdir(), "fanout-nginx-"));
  mkdirSync(path.join(dir, "logs"));
  const site = readFileSync(path.resolve(here, "../../deploy/nginx/fanout.conf"), "utf8").replace(
    /listen 8090;/,
    `listen 127.0.0.1:${listen};`,
  );
  const upstream = `upstream fanout_nodes {\n${ports
    .map((p) => `    server 127.0.0.1:${p} max_fails=1 fail_timeout=2s;`)
    .join("\n")}\n    keepalive 16;\n}\n`;
  writeFileSync(path.join(dir, "site.conf"), site);
  writeFileSync(path.join(dir, "upstream.conf"), upstream);
  writeFileSync(
    path.join(dir, "nginx.conf"),
    `worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  include ${dir}/upstream.conf;
  include ${dir}/site.conf;
}
`,
  );
  const child = spawn("nginx", ["-p", dir, "-c", path.join(dir, "nginx.conf"), "-g", "daemon off;"], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  const base = `http://127.0.0.1:${listen}`;
  await waitFor(async () => {
    try {
      return (await fetch(`${base}/api/health`)).status > 0;
    } catch {
      return false;
    }
  }, "nginx");
  return { base, dir, stop: () => child.kill("SIGTERM") };
}
