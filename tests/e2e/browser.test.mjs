// A real browser: headless Chromium loads deploy/example/index.html, which
// subscribes with the PocketBase SDK through nginx to a 2-node cluster and
// reports what it receives back to this test.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { startNode, startRedis, startNginx, waitFor, publish, freePort } from "./lib.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));

function chromiumBinary() {
  for (const bin of [process.env.CHROMIUM, "chromium", "chromium-browser"].filter(Boolean)) {
    try {
      execFileSync(bin, ["--version"], { stdio: "ignore" });
      return bin;
    } catch {}
  }
  throw new Error("chromium not found (scripts/test installs Debian's chromium package)");
}

let redis, nginx, page, browser;
const nodes = [];
const reports = [];

before(async () => {
  redis = await startRedis();
  for (let i = 0; i < 2; i++) {
    nodes.push(await startNode({ FANOUT_REDIS_URL: redis.url, FANOUT_TRUSTED_PROXIES: "127.0.0.1" }));
  }
  nginx = await startNginx(nodes.map((n) => n.port));
  // The page and the SDK's browser build, from another origin than nginx:
  // the SDK's requests are cross-origin, as from a real site.
  const files = {
    "/index.html": ["text/html", readFileSync(path.resolve(here, "../../deploy/example/index.html"))],
    "/pocketbase.es.mjs": [
      "text/javascript",
      readFileSync(path.resolve(here, "node_modules/pocketbase/dist/pocketbase.es.mjs")),
    ],
  };
  const port = await freePort();
  page = createServer((req, res) => {
    if (req.method === "POST" && req.url === "/report") {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        reports.push(JSON.parse(body));
        res.writeHead(204, { "access-control-allow-origin": "*" }).end();
      });
      return;
    }
    const file = files[req.url.split("?")[0]];
    if (!file) return res.writeHead(404).end();
    res.writeHead(200, { "content-type": file[0] }).end(file[1]);
  }).listen(port, "127.0.0.1");
  page.base = `http://127.0.0.1:${port}`;
});

after(async () => {
  browser?.kill("SIGKILL");
  page?.close();
  nginx?.stop();
  for (const n of nodes) await n.stop("SIGKILL");
  redis?.stop();
});

test("headless Chromium shows a live feed through nginx", async () => {
  const url =
    `${page.base}/index.html?server=${encodeURIComponent(nginx.base)}` +
    `&topic=news&report=${encodeURIComponent(page.base + "/report")}`;
  browser = spawn(
    chromiumBinary(),
    [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--user-data-dir=${mkdtempSync(path.join(os.tmpdir(), "fanout-chromium-"))}`,
      url,
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let chromiumLog = "";
  browser.stderr.on("data", (d) => (chromiumLog += d));
  try {
    await waitFor(() => reports.some((r) => r.type === "ready" || r.type === "error"), "the page subscribed", 60000);
  } catch (e) {
    console.log(`# chromium stderr:\n${chromiumLog.replace(/^/gm, "#   ")}`);
    throw e;
  }
  const ready = reports.find((r) => r.type === "ready");
  assert.ok(ready, `page failed: ${JSON.stringify(reports)}\nchromium: ${chromiumLog}`);
  assert.equal(ready.clientId.length, 40);

  for (let n = 1; n <= 3; n++) {
    await publish(nodes[n % 2].base, { topic: "news", data: { n, text: `hello ${n}` } });
  }
  await waitFor(() => reports.filter((r) => r.type === "message").length >= 3, "messages in the browser").catch((e) => {
    console.log(`# reports: ${JSON.stringify(reports)}`);
    throw e;
  });
  assert.deepEqual(
    reports.filter((r) => r.type === "message").map((r) => r.data),
    [1, 2, 3].map((n) => ({ n, text: `hello ${n}` })),
  );
});
