//! `gve plugin ...`: list, show, load, replace and unload plugins of a running agent.

use crate::agent::plugin_admin::{LimitsPatch, ReplaceSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;

use hyper::Method;

use super::output::{self, Output};
use crate::api::client::Client;
use crate::api::ApiError;
use crate::plugin::{DirGrant, Grants, Limits, PluginSpec, PluginSummary};

/// Arguments of `gve plugin`.
#[derive(Debug, clap::Args)]
pub struct PluginArgs {
    /// Agent URL.
    #[arg(
        long,
        env = "GVE_AGENT_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub url: String,
    /// Admin bearer token of the agent.
    #[arg(long, env = "GVE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// agent: the SHA-256 fingerprint of its certificate.
    #[arg(long, env = "GVE_AGENT_FINGERPRINT", global = true)]
    pub fingerprint: Option<String>,
    /// For an agent that requires client certificates (mutual TLS): one it
    /// admits (PEM; its `tls.client-fingerprints`), with --key.
    #[arg(long, env = "GVE_AGENT_CERT", global = true)]
    pub cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, env = "GVE_AGENT_KEY", global = true)]
    pub key: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t, global = true)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// Plugin actions.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// List loaded plugins.
    List,
    /// Show one plugin.
    Show {
        /// Plugin name.
        name: String,
    },
    /// Load a plugin bundle (a directory with gve-plugin.toml).
    Load(SpecArgs),
    /// Replace a loaded plugin with another version, without stopping calls.
    Replace {
        /// Plugin name.
        name: String,
        /// The new version.
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Unload a plugin.
    Unload {
        /// Plugin name.
        name: String,
    },
    /// Load a bundle here, in this process (no agent), and say what it is and what
    /// it costs: exports, capabilities, component size, compile and instantiation
    /// time, linear memory.
    Inspect {
        /// Bundle directory or manifest file.
        bundle: PathBuf,
    },
}

/// A bundle plus the operator's grants and limits.
#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// Bundle directory or manifest file (as the agent sees it).
    pub bundle: PathBuf,
    /// Allow outgoing HTTP to HOST:PORT (repeatable).
    #[arg(long = "grant-http", value_name = "HOST:PORT")]
    pub http: Vec<String>,
    /// How to verify the TLS server at a granted HTTP authority:
    /// HOST:PORT=sha256:HEX (pinned certificate) or HOST:PORT=ca:PATH (repeatable).
    #[arg(long = "grant-tls", value_name = "HOST:PORT=sha256:HEX|ca:PATH")]
    pub tls: Vec<String>,
    /// Allow the libvirt URI (repeatable).
    #[arg(long = "grant-libvirt", value_name = "URI")]
    pub libvirt: Vec<String>,
    /// Preopen a directory: HOST_DIR:GUEST_PATH[:rw] (repeatable).
    #[arg(long = "grant-dir", value_name = "HOST:GUEST[:rw]")]
    pub dirs: Vec<String>,
    /// Allow the in-guest agent channel.
    #[arg(long = "grant-guest-channel")]
    pub guest_channel: bool,
    /// A config value KEY=VALUE (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    /// Memory cap per instance, MiB.
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Budget of one call, milliseconds.
    #[arg(long)]
    pub call_timeout_ms: Option<u64>,
    /// What one call may wait beyond its budget, milliseconds, for libvirt calls
    /// long by nature (migrations, full disk copies, snapshots); 0: none.
    #[arg(long)]
    pub long_call_timeout_ms: Option<u64>,
    /// What ending a guest command takes the plugin, milliseconds, when more than
    /// its manifest declares (at most 60000); guest commands get the call budget
    /// less it. 0 drops a margin set before (replace).
    #[arg(long)]
    pub exec_margin_ms: Option<u64>,
}

impl SpecArgs {
    /// For `replace`: only what was given changes; grants, config and limits not
    /// named on the command line are kept as they are.
    fn change(&self) -> Result<ReplaceSpec, ApiError> {
        let full = self.spec()?;
        let grants_given = !self.http.is_empty()
            || !self.tls.is_empty()
            || !self.libvirt.is_empty()
            || !self.dirs.is_empty()
            || self.guest_channel
            || !self.config.is_empty();
        let limits_given = self.memory_mib.is_some()
            || self.call_timeout_ms.is_some()
            || self.long_call_timeout_ms.is_some()
            || self.exec_margin_ms.is_some();
        Ok(ReplaceSpec {
            bundle: Some(full.bundle),
            grants: grants_given.then_some(full.grants),
            limits: limits_given.then(|| LimitsPatch {
                memory_mib: self.memory_mib,
                call_timeout_ms: self.call_timeout_ms,
                long_call_timeout_ms: self.long_call_timeout_ms,
                exec_margin_ms: self.exec_margin_ms,
                ..Default::default()
            }),
        })
    }

    fn spec(&self) -> Result<PluginSpec, ApiError> {
        let mut dirs = Vec::new();
        for d in &self.dirs {
            let parts: Vec<&str> = d.split(':').collect();
            let (host, guest, writable) = match parts.as_slice() {
                [h, g] => (h, g, false),
                [h, g, "rw"] => (h, g, true),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "--grant-dir '{d}' must be HOST:GUEST or HOST:GUEST:rw"
                    )))
                }
            };
            let host = std::path::absolute(host)
                .map_err(|e| ApiError::bad_request(format!("--grant-dir {host}: {e}")))?;
            dirs.push(DirGrant {
                host,
                guest: guest.to_string(),
                writable,
            });
        }
        let tls = self
            .tls
            .iter()
            .map(|t| crate::plugin::grants::parse_tls_grant(t))
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(ApiError::bad_request)?;
        let mut config = BTreeMap::new();
        for kv in &self.config {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!("--config '{kv}' must be KEY=VALUE"))
            })?;
            config.insert(k.to_string(), v.to_string());
        }
        let mut limits = Limits::default();
        if let Some(m) = self.memory_mib {
            limits.memory_mib = m;
        }
        if let Some(t) = self.call_timeout_ms {
            limits.call_timeout_ms = t;
        }
        if let Some(t) = self.long_call_timeout_ms {
            limits.long_call_timeout_ms = t;
        }
        limits.exec_margin_ms = self.exec_margin_ms.filter(|m| *m != 0);
        let bundle = std::path::absolute(&self.bundle)
            .map_err(|e| ApiError::bad_request(format!("{}: {e}", self.bundle.display())))?;
        Ok(PluginSpec {
            bundle,
            grants: Grants {
                http: self.http.clone(),
                libvirt: self.libvirt.clone(),
                guest_channel: self.guest_channel,
                directories: dirs,
                config,
                config_files: Default::default(),
                tls,
            },
            limits,
        })
    }
}

/// Runs a plugin command; returns the exit code.
pub async fn run(args: PluginArgs) -> i32 {
    if let Action::Inspect { bundle } = &args.action {
        return match inspect(bundle).await {
            Ok(report) => {
                match args.output {
                    Output::Json => output::json(&report),
                    Output::Table => print!("{}", report.text()),
                }
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        };
    }
    match act(&args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", e.message);
            super::exit_code(&e)
        }
    }
}

async fn act(args: &PluginArgs) -> Result<(), ApiError> {
    let client = Client::with_tls(
        &args.url,
        args.token.clone(),
        &crate::api::tls::ClientTls {
            fingerprint: args.fingerprint.clone(),
            cert: args.cert.clone(),
            key: args.key.clone(),
            ..Default::default()
        },
    )?;
    let one = |s: PluginSummary| {
        // Said on stderr whatever the output format: a grant that was silently
        // ignored is the kind of thing an operator only finds when it bites.
        if !s.ignored_grants.is_empty() {
            eprintln!(
                "warning: plugin '{}' was granted {} but its manifest does not request it, so it is not lent",
                s.name,
                s.ignored_grants.join(", ")
            );
        }
        print(args.output, &[s])
    };
    match &args.action {
        Action::List => {
            let all: Vec<PluginSummary> = client.get("/v1/plugins").await?;
            print(args.output, &all);
        }
        Action::Show { name } => one(client.get(&format!("/v1/plugins/{name}")).await?),
        Action::Load(spec) => one(client
            .call(Method::POST, "/v1/plugins", Some(&spec.spec()?))
            .await?),
        Action::Replace { name, spec } => one(client
            .call(
                Method::PUT,
                &format!("/v1/plugins/{name}"),
                Some(&spec.change()?),
            )
            .await?),
        Action::Inspect { .. } => unreachable!("inspect runs without an agent"),
        Action::Unload { name } => {
            let v: serde_json::Value = client
                .call::<(), _>(Method::DELETE, &format!("/v1/plugins/{name}"), None)
                .await?;
            match args.output {
                Output::Json => output::json(&v),
                Output::Table => println!("unloaded {name}"),
            }
        }
    }
    Ok(())
}

/// What a plugin exports, as the tables show it.
fn exports(p: &PluginSummary) -> &'static str {
    match (p.driver, p.guest) {
        (true, true) => "driver+guest",
        (true, false) => "driver",
        _ => "guest",
    }
}

fn print(out: Output, plugins: &[PluginSummary]) {
    match out {
        Output::Json => output::json(plugins),
        Output::Table => {
            let rows: Vec<Vec<String>> = plugins
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.version.clone(),
                        p.contract.clone(),
                        exports(p).to_string(),
                        p.hypervisor_kind.clone().unwrap_or_else(|| "-".into()),
                        p.origin.clone(),
                        p.sha256[..12.min(p.sha256.len())].to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAME", "VERSION", "CONTRACT", "EXPORTS", "KIND", "ORIGIN", "SHA256",
                ],
                &rows,
            );
        }
    }
}

/// What `gve plugin inspect` found out about a bundle.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Inspection {
    /// The plugin as the host loaded it.
    pub plugin: PluginSummary,
    /// Size of the component file, bytes.
    pub component_bytes: u64,
    /// Compiling it (no cache), ms.
    pub compile_ms: f64,
    /// Instantiating it, ms.
    pub instantiate_ms: f64,
    /// Its first `info` call, ms.
    pub info_ms: f64,
    /// Linear memory after instantiation and `info`, bytes.
    pub memory_bytes: u64,
}

impl Inspection {
    /// The human form.
    pub fn text(&self) -> String {
        let p = &self.plugin;
        let exports = exports(p);
        let caps = if p.capabilities.is_empty() {
            "(none)".to_string()
        } else {
            p.capabilities.join(" ")
        };
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        format!(
            "plugin        {} {} ({})\n\
             component     {} ({:.2} MiB), sha256 {}\n\
             exports       {exports}\n\
             hypervisor    {}\n\
             capabilities  {caps}\n\
             exec margin   {} ms (guest commands get the call budget less it)\n\
             compile       {:.0} ms (no cache)\n\
             instantiate   {:.2} ms\n\
             first info    {:.2} ms\n\
             memory        {:.2} MiB of linear memory after instantiation (cap {} MiB)\n",
            p.name,
            p.version,
            p.contract,
            p.component.display(),
            mib(self.component_bytes),
            p.sha256,
            p.hypervisor_kind.as_deref().unwrap_or("-"),
            p.exec_margin_ms,
            self.compile_ms,
            self.instantiate_ms,
            self.info_ms,
            mib(self.memory_bytes),
            p.limits.memory_mib,
        )
    }
}

/// Loads `bundle` into a plugin host of this process (fresh cache, no grants,
/// default limits) and measures it.
pub async fn inspect(bundle: &std::path::Path) -> Result<Inspection, crate::plugin::PluginError> {
    use crate::plugin::{HostConfig, PluginError, PluginHost};
    let io = |e: std::io::Error| PluginError::Config(format!("a scratch directory: {e}"));
    let cache = tempfile::tempdir().map_err(io)?;
    let host = PluginHost::new(HostConfig {
        cache_dir: cache.path().join("cache"),
        engine: Default::default(),
    })?;
    let t = std::time::Instant::now();
    let plugin = host
        .load(PluginSpec {
            bundle: bundle.to_path_buf(),
            grants: Grants::default(),
            limits: Limits::default(),
        })
        .await?;
    let compile = t.elapsed();
    let cost = host.footprint(&plugin.name).await?;
    let component_bytes = std::fs::metadata(&plugin.component).map_err(io)?.len();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    Ok(Inspection {
        component_bytes,
        compile_ms: ms(compile),
        instantiate_ms: ms(cost.instantiate),
        info_ms: ms(cost.info),
        memory_bytes: cost.memory_bytes,
        plugin,
    })
}
