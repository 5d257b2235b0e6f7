// The deployment artifacts validate offline: nginx -t on the shipped
// config, the compose file against the Compose specification schema, the
// Kubernetes manifests against the Kubernetes schemas. (scripts/test
// installs nginx, check-jsonschema and kubernetes-validate.) The image, the
// compose stack and the manifests are also built and run for real with
// podman: containers.test.mjs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, writeFileSync, mkdirSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const run = (cmd, args) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

test("nginx -t accepts deploy/nginx (site and compose upstream)", () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "fanout-nginx-t-"));
  mkdirSync(path.join(dir, "logs"));
  // nginx resolves upstream names while testing; the compose service name
  // "fanout" only exists inside compose, so point it at loopback here.
  const upstream = readFileSync(path.join(root, "deploy/nginx/upstream.compose.conf"), "utf8").replace(
    "server fanout:8090",
    "server 127.0.0.1:8090",
  );
  writeFileSync(path.join(dir, "upstream.conf"), upstream);
  writeFileSync(
    path.join(dir, "nginx.conf"),
    `pid ${dir}/nginx.pid;
error_log ${dir}/logs/error.log;
events {}
http {
  client_body_temp_path ${dir}/body; proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi; uwsgi_temp_path ${dir}/uwsgi; scgi_temp_path ${dir}/scgi;
  include ${dir}/upstream.conf;
  include ${path.join(root, "deploy/nginx/fanout.conf")};
}
`,
  );
  const r = spawnSync("nginx", ["-t", "-p", dir, "-c", path.join(dir, "nginx.conf")], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  // nginx reports on stderr.
  assert.match(r.stderr, /syntax is ok/);
  assert.match(r.stderr, /test is successful/);
});

test("docker-compose.yml follows the Compose specification", () => {
  run("check-jsonschema", ["--builtin-schema", "vendor.compose-spec", path.join(root, "docker-compose.yml")]);
  const compose = readFileSync(path.join(root, "docker-compose.yml"), "utf8");
  assert.match(compose, /replicas: 3/);
  assert.doesNotMatch(compose, /container_name/, "--scale needs unnamed containers");
});

test("deploy/k8s manifests validate against the Kubernetes schemas", () => {
  const dir = path.join(root, "deploy/k8s");
  const manifests = readdirSync(dir)
    .filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml")
    .map((f) => path.join(dir, f));
  assert.ok(manifests.length >= 7);
  run("kubernetes-validate", ["--strict", ...manifests]);
  // Every resource the kustomization lists exists.
  const kustomization = readFileSync(path.join(dir, "kustomization.yaml"), "utf8");
  for (const m of kustomization.matchAll(/^\s+- (\S+\.yaml)/gm)) {
    assert.ok(manifests.includes(path.join(dir, m[1])), `${m[1]} exists`);
  }
});

test("the shipped nginx refuses /metrics through the balancer; each node serves it on its own address", async () => {
  const { startNode, startNginx } = await import("./lib.mjs");
  const node = await startNode();
  const nginx = await startNginx([node.port]);
  try {
    const direct = await fetch(`${node.base}/metrics`);
    assert.equal(direct.status, 200);
    assert.match(await direct.text(), /fanout_connections_opened_total/);
    for (const p of ["/metrics", "/metrics?x=1"]) {
      const res = await fetch(`${nginx.base}${p}`);
      assert.equal(res.status, 403, `${p} through nginx`);
      assert.doesNotMatch(await res.text(), /fanout_/);
    }
    // Everything else still goes through.
    assert.equal((await fetch(`${nginx.base}/api/health`)).status, 200);
  } finally {
    nginx.stop();
    await node.stop();
  }
});

test("deploy/nginx/reload.sh reports a reload only once new workers run, and fails when nginx's master cannot resolve the upstream", async () => {
  const { freePort } = await import("./lib.mjs");
  const { chmodSync, existsSync } = await import("node:fs");
  const dir = mkdtempSync(path.join(os.tmpdir(), "fanout-nginx-reload-"));
  mkdirSync(path.join(dir, "logs"));
  mkdirSync(path.join(dir, "bin"));
  const up = path.join(dir, "up.conf");
  const good = "upstream u { server localhost:9; }\n";
  writeFileSync(up, good);
  writeFileSync(
    path.join(dir, "nginx.conf"),
    `worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/logs/error.log;
events {}
http {
  client_body_temp_path ${dir}/body; proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi; uwsgi_temp_path ${dir}/uwsgi; scgi_temp_path ${dir}/scgi;
  include ${up};
  server { listen 127.0.0.1:${await freePort()}; location / { proxy_pass http://u; } }
}
`,
  );
  // `nginx` as the script calls it, pointed at this prefix. With `break`
  // present, a reload signal reaches the master only after the upstream's
  // name stopped resolving: the signaller succeeds, the master keeps its
  // old configuration (the race seen with freshly scaled replicas).
  const wrapper = path.join(dir, "bin/nginx");
  const nginx = run("sh", ["-c", "command -v nginx"]).trim();
  writeFileSync(
    wrapper,
    `#!/bin/sh
if [ "$*" = "-s reload" ] && [ -e ${dir}/break ]; then
  echo "upstream u { server nonexistent.invalid:9; }" > ${up}
  kill -HUP "$(cat ${dir}/nginx.pid)"
  exit 0
fi
exec ${nginx} -p ${dir} -c ${dir}/nginx.conf "$@"
`,
  );
  chmodSync(wrapper, 0o755);
  // Daemonized: its stdio must not be a pipe the test waits on.
  assert.equal(spawnSync("nginx", ["-p", dir, "-c", path.join(dir, "nginx.conf")], { stdio: "ignore" }).status, 0);
  await waitForFile(path.join(dir, "nginx.pid"), existsSync);
  const master = readFileSync(path.join(dir, "nginx.pid"), "utf8").trim();
  const reload = () =>
    spawnSync("sh", [path.join(root, "deploy/nginx/reload.sh")], {
      encoding: "utf8",
      env: { ...process.env, PATH: `${dir}/bin:${process.env.PATH}`, MASTER_PID: master, ATTEMPTS: "2" },
    });
  try {
    for (let i = 0; i < 3; i++) {
      const ok = reload();
      assert.equal(ok.status, 0, ok.stderr);
      assert.match(ok.stdout, /nginx reloaded/);
    }
    writeFileSync(path.join(dir, "break"), "");
    const failed = reload();
    assert.equal(failed.status, 1, `a reload the master refused is reported: ${failed.stdout}`);
    assert.match(readFileSync(path.join(dir, "logs/error.log"), "utf8"), /host not found in upstream/);
  } finally {
    writeFileSync(up, good);
    spawnSync("nginx", ["-p", dir, "-c", path.join(dir, "nginx.conf"), "-s", "quit"], { stdio: "ignore" });
  }
});

async function waitForFile(file, exists) {
  for (let i = 0; i < 100 && !exists(file); i++) await new Promise((r) => setTimeout(r, 50));
}
