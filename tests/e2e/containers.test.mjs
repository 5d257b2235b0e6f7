// The shipped container artifacts, built and run for real with podman:
// deploy/Dockerfile as a user builds it, docker-compose.yml brought up by
// podman-compose (redis, 3 fanout replicas, nginx), the official SDK through
// the compose nginx port, and faults injected on the containers.
//
// What differs from a Docker host, and why (tests/container-standins.sh and
// ../shared notes): the base images are local stand-ins with the same names;
// podman runs with runc and the host's rlimits, so the fanout service's
// `ulimits:` is reset by tests/e2e/compose/no-ulimits.yml (the only change
// to the compose file); health checks need systemd timers, which this
// machine does not run, so the tests run each HEALTHCHECK with
// `podman healthcheck run`, as the timer would.
//
// scripts/test runs this file after the other end-to-end suites:
//   cd tests/e2e && node --test containers.test.mjs
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import PocketBase from "pocketbase";
import { waitFor } from "./lib.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const env = {
  ...process.env,
  CONTAINERS_CONF: path.join(root, "target/containers/containers.conf"),
  FANOUT_PUBLISH_KEY: "compose-e2e-key",
};
const KEY = env.FANOUT_PUBLISH_KEY;
const NGINX = "http://127.0.0.1:8090";
const COMPOSE = ["-f", "docker-compose.yml", "-f", "tests/e2e/compose/no-ulimits.yml"];

/** Run a command; its stdout, or a thrown error with its stderr. */
function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: root, env, encoding: "utf8", maxBuffer: 64 << 20, ...opts });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.status}: ${r.stderr?.slice(-2000) ?? ""}`);
  return (r.stdout ?? "").trim();
}
const podman = (...args) => run("podman", args);
const compose = (...args) => run("podman-compose", [...COMPOSE, ...args]);
/** Exit status of a container's HEALTHCHECK, run once as podman's timer would. */
const healthcheck = (name) => spawnSync("podman", ["healthcheck", "run", name], { env }).status;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const replicas = () =>
  podman("ps", "--filter", "label=com.docker.compose.service=fanout", "--format", "{{.Names}}")
    .split("\n")
    .filter(Boolean)
    .sort();
const ipOf = (name) => podman("inspect", name, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}");

async function health(base) {
  try {
    const res = await fetch(`${base}/api/health`, { signal: AbortSignal.timeout(2000) });
    return { status: res.status, node: (await res.json()).data?.node };
  } catch {
    return { status: 0 };
  }
}

/** Every running replica by name: its address from the host and its node tag. */
async function replicaInfo() {
  const out = [];
  for (const name of replicas()) {
    const base = `http://${ipOf(name)}:8090`;
    await waitFor(async () => (await health(base)).status === 200, `${name} healthy`, 30000);
    out.push({ name, base, tag: (await health(base)).node });
  }
  return out;
}

async function publish(base, body) {
  return fetch(`${base}/api/publish`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${KEY}` },
    body: JSON.stringify(body),
  });
}

const sdk = [];
/** An SDK client through the compose nginx port, subscribed to `topic`. */
async function subscriber(topic) {
  const pb = new PocketBase(NGINX);
  sdk.push(pb);
  const got = [];
  // 503 means "try again" (docs/protocol.md). A client that lands right
  // after a replica restarted can get one; it is printed, not hidden.
  for (let attempt = 1; ; attempt++) {
    try {
      await pb.realtime.subscribe(topic, (e) => got.push(e.n));
      break;
    } catch (e) {
      if (e?.status !== 503 || attempt >= 20) throw e;
      console.log(`# subscribe answered 503, trying again: ${e.message}`);
      await sleep(250);
    }
  }
  return { pb, got, id: pb.realtime.clientId };
}
const ownerTag = (c) => c.pb.realtime.clientId?.slice(0, 8);

before(async () => {
  run(path.join(root, "tests/container-standins.sh"), [], { stdio: ["ignore", "inherit", "inherit"] });
  // What the Dockerfile's header tells a user to run, with the two flags
  // podman needs here: chroot isolation, and Docker's image format (OCI
  // images drop HEALTHCHECK).
  const t0 = Date.now();
  run("podman", ["build", "--isolation", "chroot", "--network", "host", "--format", "docker",
    "-f", "deploy/Dockerfile", "-t", "fanout", "."], { stdio: ["ignore", "ignore", "inherit"] });
  console.log(`# podman build of deploy/Dockerfile: ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  // The build stages of earlier runs, now untagged: each is a gigabyte.
  spawnSync("podman", ["image", "prune", "-f"], { env });
  // Leftovers of an interrupted run.
  composeDown();
  spawnSync("podman", ["rm", "-f", "fanout-image-check"], { env });
});

after(() => {
  // A test that failed midway leaves clients reconnecting: stop them all,
  // or their retries keep this process alive.
  for (const pb of sdk) {
    pb.realtime.unsubscribe().catch(() => {});
    pb.realtime.disconnect?.();
  }
  composeDown();
  spawnSync("podman", ["rm", "-f", "fanout-image-check"], { env });
  kubeCleanup();
});

/**
 * Take the compose stack down, with the replicas a scale-up added:
 * podman-compose 1.6's `down` removes only the declared 3, so an
 * interrupted scaling test would leave fanout_fanout_4 and _5 running into
 * the next run.
 */
function composeDown() {
  spawnSync("podman-compose", [...COMPOSE, "down", "-t", "2"], { cwd: root, env });
  const names = spawnSync("podman", ["ps", "-a", "--format", "{{.Names}}"], { env, encoding: "utf8" })
    .stdout.split("\n")
    .filter((n) => n.startsWith("fanout_fanout_"));
  if (names.length) spawnSync("podman", ["rm", "-f", "-t", "2", ...names], { env });
}

test("the image from deploy/Dockerfile runs fanout as uid 10001 and its HEALTHCHECK exits 0", async () => {
  podman("run", "-d", "--name", "fanout-image-check", "fanout");
  await waitFor(() => healthcheck("fanout-image-check") === 0, "the HEALTHCHECK command passes", 20000);
  assert.equal(podman("inspect", "fanout-image-check", "--format", "{{.State.Health.Status}}"), "healthy");
  // The running process, as the host's kernel sees it.
  const pid = podman("inspect", "fanout-image-check", "--format", "{{.State.Pid}}");
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  assert.match(status, /^Uid:\s+10001\s+10001\s+10001\s+10001$/m);
  assert.match(readFileSync(`/proc/${pid}/cmdline`, "utf8"), /^\/usr\/local\/bin\/fanout/);
  podman("rm", "-f", "fanout-image-check");
});

test("the image adds under 25 MB to its debian:bookworm-slim base", () => {
  const size = (image) => Number(podman("image", "inspect", image, "--format", "{{.Size}}"));
  const image = size("localhost/fanout:latest");
  const base = size("docker.io/library/debian:bookworm-slim");
  const mb = (b) => (b / 1e6).toFixed(1);
  console.log(`# image ${mb(image)} MB = base ${mb(base)} MB (the stand-in) + fanout ${mb(image - base)} MB`);
  assert.ok(image - base < 25e6, `fanout adds ${mb(image - base)} MB`);
});

test("podman-compose brings up docker-compose.yml: redis, 3 fanout replicas passing their HEALTHCHECK, and nginx", async () => {
  compose("up", "-d");
  const running = podman("ps", "--format", "{{.Names}}").split("\n");
  for (const name of ["fanout_redis_1", "fanout_nginx_1"]) assert.ok(running.includes(name), `${name} runs`);
  assert.deepEqual(replicas(), ["fanout_fanout_1", "fanout_fanout_2", "fanout_fanout_3"]);
  for (const name of replicas()) {
    await waitFor(() => healthcheck(name) === 0, `${name} HEALTHCHECK`, 30000);
  }
  await waitFor(async () => (await health(NGINX)).status === 200, "nginx answers", 20000);
});

test("SDK clients through the compose nginx port get every message published through each replica, in order", async () => {
  const nodes = await replicaInfo();
  const clients = [];
  for (let i = 0; i < 30; i++) clients.push(await subscriber("compose"));
  const tags = new Set(clients.map(ownerTag));
  assert.equal(tags.size, 3, "nginx spread the streams over the 3 replicas");
  const sent = [];
  for (let n = 0; n < 60; n++) {
    const res = await publish(nodes[n % 3].base, { topic: "compose", data: { n } });
    assert.equal(res.status, 200, await res.text());
    sent.push(n);
  }
  await waitFor(() => clients.every((c) => c.got.length >= sent.length), "every message delivered", 15000);
  for (const c of clients) assert.deepEqual(c.got, sent);
  for (const c of clients) await c.pb.realtime.unsubscribe();
});

test("podman kill of one replica: its SDK clients reconnect through nginx and receive again", async () => {
  const nodes = await replicaInfo();
  const clients = [];
  for (let i = 0; i < 12; i++) clients.push(await subscriber("after-kill"));
  const victim = nodes[1];
  const affected = clients.filter((c) => ownerTag(c) === victim.tag);
  assert.ok(affected.length > 0, "some streams on the victim");
  podman("kill", victim.name);
  await waitFor(
    () => affected.every((c) => c.pb.realtime.clientId && c.pb.realtime.clientId !== c.id),
    "the victim's clients reconnected with new ids",
    20000,
  );
  let n = 0;
  await waitFor(async () => {
    await publish(nodes[0].base, { topic: "after-kill", data: { n: ++n } });
    await sleep(50);
    return clients.every((c) => c.got.length > 0);
  }, "delivery after the kill", 20000);
  for (const c of clients) assert.notEqual(ownerTag(c), victim.tag);
  for (const c of clients) await c.pb.realtime.unsubscribe();
  podman("start", victim.name);
  await waitFor(() => healthcheck(victim.name) === 0, `${victim.name} back`, 30000);
});

test("with redis stopped every replica's HEALTHCHECK fails and publish answers 503; with redis started again delivery resumes", async () => {
  const nodes = await replicaInfo();
  const before = await subscriber("outage");
  podman("stop", "-t", "1", "fanout_redis_1");
  for (const node of nodes) {
    await waitFor(() => healthcheck(node.name) !== 0, `${node.name} HEALTHCHECK fails`, 20000);
    assert.equal((await health(node.base)).status, 503);
  }
  const refused = await publish(NGINX, { topic: "outage", data: { n: 0 } });
  assert.equal(refused.status, 503, "publish through nginx during the outage");
  assert.equal((await refused.json()).status, 503);

  podman("start", "fanout_redis_1");
  for (const node of nodes) await waitFor(() => healthcheck(node.name) === 0, `${node.name} healthy again`, 30000);
  const after = await subscriber("outage");
  // Streams held through the outage reconnect if their node closed them;
  // either way both clients receive what is published now.
  let n = 0;
  await waitFor(async () => {
    const res = await publish(NGINX, { topic: "outage", data: { n: ++n } });
    assert.equal(res.status, 200, `publish after the outage: ${res.status}`);
    await sleep(50);
    return before.got.length > 0 && after.got.length > 0;
  }, "delivery after redis is back", 20000);
  assert.ok(!before.got.includes(0) && !after.got.includes(0), "the refused publish was not delivered");
  for (const c of [before, after]) await c.pb.realtime.unsubscribe();
});

test("scaled to 5 replicas with nginx reloaded as the docs say, new clients reach all 5; scaled back to 3, every client receives", async () => {
  // docker-compose.yml's header, for podman-compose.
  compose("up", "-d", "--scale", "fanout=5");
  // Not a bare `nginx -s reload`: on a fresh machine it failed once with
  // `host not found in upstream "fanout:8090"` while the new replicas'
  // names settled. The shipped script retries until new workers run.
  console.log(`# after scaling up: ${compose("exec", "-T", "nginx", "sh", "/etc/nginx/fanout-reload.sh")}`);
  let nodes = await replicaInfo();
  assert.equal(nodes.length, 5);
  const clients = [];
  await waitFor(async () => {
    clients.push(await subscriber("scaled"));
    return new Set(clients.map(ownerTag)).size === 5;
  }, "streams on all 5 replicas", 20000);
  assert.ok(clients.length <= 25, `${clients.length} clients for 5 replicas`);

  // Back to 3. podman-compose 1.6 does not remove replicas when scaling down;
  // docs/operations.md gives these steps for it.
  compose("up", "-d", "--scale", "fanout=3");
  podman("stop", "-t", "10", "fanout_fanout_4", "fanout_fanout_5");
  podman("rm", "fanout_fanout_4", "fanout_fanout_5");
  console.log(`# after scaling down: ${compose("exec", "-T", "nginx", "sh", "/etc/nginx/fanout-reload.sh")}`);
  nodes = await replicaInfo();
  assert.equal(nodes.length, 3);
  const live = new Set(nodes.map((n) => n.tag));
  await waitFor(() => clients.every((c) => live.has(ownerTag(c))), "clients of removed replicas reconnected", 20000);
  // A new id comes before the SDK has re-sent its subscriptions: markers
  // (negative numbers) are published until every client has one, so the
  // messages that count are published after every client is subscribed.
  let marker = 0;
  await waitFor(async () => {
    await publish(nodes[0].base, { topic: "scaled", data: { n: --marker } });
    await sleep(50);
    return clients.every((c) => c.got.some((n) => n < 0));
  }, "every client subscribed again", 20000);
  const sent = [];
  for (let n = 0; n < 30; n++) {
    assert.equal((await publish(nodes[n % 3].base, { topic: "scaled", data: { n } })).status, 200);
    sent.push(n);
  }
  await waitFor(() => clients.every((c) => sent.every((n) => c.got.includes(n))), "every client receives", 15000);
  for (const c of clients) await c.pb.realtime.unsubscribe();
});

// ---------------------------------------------------------------------------
// deploy/k8s under `podman kube play` (podman 4.3). What it runs here: the
// Deployments (one pod per replica, of which one can serve: see below),
// the ConfigMap, the Secret, securityContext and resources. What it cannot: Services (no
// kube-proxy; the test gives the Redis pod the Service's DNS name as a
// network alias), HPA, PDB, rolling updates, and probes as the kubelet runs
// them (podman 4.3 turns only liveness probes into health checks), so the
// test performs the readinessProbe itself, as the kubelet would.
//
// podman 4.3 binds every containerPort on the host (hostPort = containerPort),
// and this machine's own Redis holds 6379, so the pods run in a network
// namespace of their own; there, only the first fanout replica can bind 8090. podman 4.3 also reads a Secret as a flat JSON map of
// base64 values (containers/podman#17071), so the test stores secret.yaml's
// stringData in that form, as the API server would store it in `data`.
const K8S = path.join(root, "deploy/k8s");
const NETNS = "fanout-k8s-test";
const inNetns = (cmd, args) => run("nsenter", [`--net=/var/run/netns/${NETNS}`, cmd, ...args]);
const kpodman = (...args) => inNetns("podman", args);
/** A manifest's YAML documents, parsed (once) by the tools venv's PyYAML. */
const manifests = new Map();
const manifest = (file) => {
  if (!manifests.has(file)) {
    const script = "import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    manifests.set(file, JSON.parse(run("python3", ["-c", script, path.join(K8S, file)])));
  }
  return manifests.get(file);
};

function kubeCleanup() {
  for (const file of ["deployment.yaml", "redis.yaml"]) spawnSync("podman", ["kube", "down", path.join(K8S, file)], { env });
  spawnSync("podman", ["secret", "rm", "fanout"], { env });
  spawnSync("podman", ["network", "rm", "-f", "fanout-k8s"], { env });
  spawnSync("ip", ["netns", "del", NETNS]);
}

/** The Deployment's readinessProbe (an httpGet), performed as the kubelet does. */
function readiness(pod, probe) {
  const ip = kpodman("inspect", `${pod}-fanout`, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}");
  const ports = manifest("deployment.yaml")[0].spec.template.spec.containers[0].ports;
  const port = ports.find((p) => p.name === probe.httpGet.port)?.containerPort ?? probe.httpGet.port;
  const code = spawnSync("nsenter", [`--net=/var/run/netns/${NETNS}`, "curl", "-s", "-o", "/dev/null", "-m", "1",
    "-w", "%{http_code}", `http://${ip}:${port}${probe.httpGet.path}`], { encoding: "utf8" }).stdout;
  return { ok: Number(code) >= 200 && Number(code) < 400, code, base: `http://${ip}:${port}` };
}

test("podman kube play runs deploy/k8s: the fanout pod starts as uid 10001 with the ConfigMap and Secret, reaches Redis, and passes its readinessProbe", async () => {
  // The compose stack goes first: podman runs one aardvark-dns for every
  // network, in the network namespace where it started, so with the compose
  // network still up, the pods' network would get no name server.
  compose("down", "-t", "2");
  kubeCleanup();
  run("ip", ["netns", "add", NETNS]);
  inNetns("ip", ["link", "set", "lo", "up"]);
  kpodman("network", "create", "fanout-k8s");
  const [secret] = manifest("secret.yaml");
  const flat = Object.fromEntries(Object.entries(secret.stringData).map(([k, v]) => [k, Buffer.from(v).toString("base64")]));
  const secretFile = path.join(root, "target/containers/secret.json");
  writeFileSync(secretFile, JSON.stringify(flat));
  run("podman", ["secret", "create", secret.metadata.name, secretFile]);
  rmSync(secretFile);

  kpodman("kube", "play", "--network", "fanout-k8s", path.join(K8S, "redis.yaml"));
  // The Service's name, which a cluster's DNS would give.
  const [, service] = manifest("redis.yaml");
  const redisInfra = kpodman("pod", "inspect", "fanout-redis-pod-0", "--format", "{{.InfraContainerID}}");
  kpodman("network", "disconnect", "fanout-k8s", redisInfra);
  kpodman("network", "connect", "--alias", service.metadata.name, "fanout-k8s", redisInfra);

  const [deployment] = manifest("deployment.yaml");
  // podman creates one pod per replica, but binds each pod's containerPort
  // on the (namespace's) host: only the first pod gets 8090, and podman
  // reports the others as failed to start. Any other failure fails the test.
  const play = spawnSync("nsenter", [`--net=/var/run/netns/${NETNS}`, "podman", "kube", "play", "--network", "fanout-k8s",
    "--configmap", path.join(K8S, "configmap.yaml"), path.join(K8S, "deployment.yaml")], { env, encoding: "utf8" });
  if (play.status !== 0) {
    const failures = play.stderr.split("\n").filter((l) => l.startsWith("starting container"));
    assert.ok(failures.length > 0, play.stderr);
    for (const l of failures) assert.match(l, /listen tcp4 :8090: bind: address already in use|a dependency of container \w+ failed to start/);
  }
  const pods = kpodman("pod", "ps", "--filter", `name=^${deployment.metadata.name}-pod-`, "--format", "{{.Name}}").split("\n");
  assert.equal(pods.length, deployment.spec.replicas, "one pod per replica");
  const probe = deployment.spec.template.spec.containers[0].readinessProbe;
  const pod = `${deployment.metadata.name}-pod-0`;
  let ready;
  await waitFor(() => (ready = readiness(pod, probe)).ok, "the readinessProbe passes", 30000).catch((e) => {
    const logs = spawnSync("podman", ["logs", "--tail", "20", `${pod}-fanout`], { env, encoding: "utf8" });
    throw new Error(`${e.message} (last answer ${ready?.code}); the pod's log:\n${logs.stdout}${logs.stderr}`);
  });

  const pid = kpodman("inspect", `${pod}-fanout`, "--format", "{{.State.Pid}}");
  assert.match(readFileSync(`/proc/${pid}/status`, "utf8"), /^Uid:\s+10001\s/m, "runAsUser");
  assert.throws(() => kpodman("exec", `${pod}-fanout`, "touch", "/probe"), /Read-only file system/, "readOnlyRootFilesystem");
  const healthJson = JSON.parse(inNetns("curl", ["-s", `${ready.base}/api/health`]));
  assert.deepEqual(healthJson.data.relay, { healthy: true, kind: "redis", mode: "standalone" }, "FANOUT_REDIS_URL from the ConfigMap");
  // The Secret's publish key is the one the pod demands.
  const publishWith = (key) =>
    inNetns("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
      "-H", `authorization: Bearer ${key}`, "-d", '{"topic":"k8s","data":{}}', `${ready.base}/api/publish`]);
  assert.equal(publishWith(secret.stringData.FANOUT_PUBLISH_KEY), "200");
  assert.equal(publishWith("wrong-key"), "403");
});

test("under podman kube play the fanout pod's readinessProbe fails while the Redis pod is stopped and passes again after", async () => {
  const [deployment] = manifest("deployment.yaml");
  const probe = deployment.spec.template.spec.containers[0].readinessProbe;
  const pod = `${deployment.metadata.name}-pod-0`;
  kpodman("pod", "stop", "-t", "1", "fanout-redis-pod-0");
  await waitFor(() => readiness(pod, probe).code === "503", "the readinessProbe answers 503", 20000);
  kpodman("pod", "start", "fanout-redis-pod-0");
  await waitFor(() => readiness(pod, probe).ok, "the readinessProbe passes again", 30000);
  kubeCleanup();
});
