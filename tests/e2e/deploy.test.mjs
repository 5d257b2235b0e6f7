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
