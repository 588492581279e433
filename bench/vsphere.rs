//! vmware-esx through gve vs the same SOAP calls made directly, on the project's
//! vSphere simulator with 404 hosts and 2,400 VMs (`-dc 4 -cluster 5 -host 20 -vm 100`).
//!
//! - gve: the driver plugin in the plugin host (sandbox, wasi:http, the host's TLS
//!   with the pinned certificate), called as the agent calls it;
//! - direct: a native client (hyper, rustls, the same pin) sending the same
//!   sequence of SOAP requests the plugin sends, with the same bodies, parsing the
//!   replies with the same XML parser; with keep-alive (what a native tool does, and
//!   the plugin host since 2026-12-01) and without (a connection per request, as the
//!   plugin host did before).
//!
//! Operations: the inventory listing (list-vms: a container view's references, then
//! properties 100 VMs at a time, then the host names the same way), get-vm by id, and
//! a power cycle (start, forced shutdown). Writes bench/results/vsphere.md; run with
//! `bash bench/run.sh vsphere`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gve::plugin::{HostConfig, Limits, PluginHost, PluginSpec};
use gve_harness::vsphere::{self, VsphereSim};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

const LIST_ROUNDS: usize = 7;
const OP_ROUNDS: usize = 25;
/// The properties the plugin reads per VM (its `vm::PROPS`).
const VM_PROPS: &[&str] = &[
    "name",
    "config.template",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.guestId",
    "config.extraConfig",
    "runtime.powerState",
    "runtime.host",
    "guest.net",
];

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// A native SOAP client making the plugin's calls.
struct Direct {
    http: HttpClient<Https, Full<Bytes>>,
    tls: rustls::ClientConfig,
    fresh: bool,
    url: String,
    cookie: String,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn connector(tls: &rustls::ClientConfig) -> Https {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_only()
        .enable_http1()
        .wrap_connector(http)
}

impl Direct {
    async fn login(url: &str, pin: &str, fresh: bool) -> Direct {
        let tls = gve::tls::ClientTls {
            fingerprint: Some(pin.into()),
            ..Default::default()
        }
        .client_config()
        .unwrap();
        let http = HttpClient::builder(TokioExecutor::new()).build(connector(&tls));
        let mut d = Direct {
            http,
            tls,
            fresh,
            url: url.into(),
            cookie: String::new(),
        };
        d.call(
            "RetrieveServiceContent",
            "ServiceInstance",
            "ServiceInstance",
            "",
        )
        .await;
        let args = format!(
            "<userName>{}</userName><password>{}</password>",
            vsphere::USERNAME,
            vsphere::PASSWORD
        );
        d.call("Login", "SessionManager", "SessionManager", &args)
            .await;
        d
    }

    /// One SOAP call; returns the reply body.
    async fn call(&mut self, method: &str, kind: &str, this: &str, args: &str) -> String {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\"><soapenv:Body><{method} xmlns=\"urn:vim25\"><_this type=\"{kind}\">{}</_this>{args}</{method}></soapenv:Body></soapenv:Envelope>",
            esc(this)
        );
        let mut req = hyper::Request::post(&self.url)
            .header("content-type", "text/xml; charset=utf-8")
            .header("soapaction", "\"urn:vim25/6.5\"");
        if !self.cookie.is_empty() {
            req = req.header("cookie", format!("vmware_soap_session={}", self.cookie));
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let resp = if self.fresh {
            // A connection per request, as the plugin host makes them.
            let http: HttpClient<Https, Full<Bytes>> = HttpClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector(&self.tls));
            http.request(req).await.unwrap()
        } else {
            self.http.request(req).await.unwrap()
        };
        if let Some(c) = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.split(';').next()?.strip_prefix("vmware_soap_session="))
        {
            self.cookie = c.trim_matches('"').to_string();
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(status.is_success(), "{method}: {status}: {text}");
        text
    }

    /// RetrievePropertiesEx of `props` on `objects`; the reply, parsed, gives
    /// (object, properties) pairs.
    async fn props(
        &mut self,
        kind: &str,
        props: &[&str],
        objects: &[String],
    ) -> Vec<(String, usize)> {
        let mut args = format!("<specSet><propSet><type>{kind}</type>");
        for p in props {
            args.push_str(&format!("<pathSet>{p}</pathSet>"));
        }
        args.push_str("</propSet>");
        for o in objects {
            args.push_str(&format!(
                "<objectSet><obj type=\"{kind}\">{}</obj><skip>false</skip></objectSet>",
                esc(o)
            ));
        }
        args.push_str("</specSet><options><maxObjects>100</maxObjects></options>");
        let text = self
            .call(
                "RetrievePropertiesEx",
                "PropertyCollector",
                "propertyCollector",
                &args,
            )
            .await;
        let doc = roxmltree::Document::parse(&text).unwrap();
        doc.descendants()
            .filter(|n| n.tag_name().name() == "objects")
            .map(|o| {
                let id = o
                    .children()
                    .find(|c| c.tag_name().name() == "obj")
                    .and_then(|c| c.text())
                    .unwrap_or("")
                    .to_string();
                let n = o
                    .children()
                    .filter(|c| c.tag_name().name() == "propSet")
                    .count();
                (id, n)
            })
            .collect()
    }

    /// Every object of `kind`: a container view's references.
    async fn every(&mut self, kind: &str) -> Vec<String> {
        let args = format!(
            "<container type=\"Folder\">group-d1</container><type>{kind}</type><recursive>true</recursive>"
        );
        let text = self
            .call("CreateContainerView", "ViewManager", "ViewManager", &args)
            .await;
        let doc = roxmltree::Document::parse(&text).unwrap();
        let view = doc
            .descendants()
            .find(|n| n.tag_name().name() == "returnval")
            .and_then(|n| n.text())
            .unwrap()
            .to_string();
        let args = format!(
            "<specSet><propSet><type>ContainerView</type><pathSet>view</pathSet></propSet><objectSet><obj type=\"ContainerView\">{}</obj><skip>false</skip></objectSet></specSet><options><maxObjects>100</maxObjects></options>",
            esc(&view)
        );
        let text = self
            .call(
                "RetrievePropertiesEx",
                "PropertyCollector",
                "propertyCollector",
                &args,
            )
            .await;
        let refs: Vec<String> = {
            let doc = roxmltree::Document::parse(&text).unwrap();
            doc.descendants()
                .filter(|n| n.tag_name().name() == "ManagedObjectReference")
                .filter_map(|n| n.text().map(str::to_string))
                .collect()
        };
        self.call("DestroyView", "ContainerView", &view, "").await;
        refs
    }

    async fn list_vms(&mut self) -> usize {
        let vms = self.every("VirtualMachine").await;
        let mut n = 0;
        for batch in vms.chunks(100) {
            n += self.props("VirtualMachine", VM_PROPS, batch).await.len();
        }
        let hosts = self.every("HostSystem").await;
        for batch in hosts.chunks(100) {
            self.props("HostSystem", &["name"], batch).await;
        }
        n - 1 // the template
    }

    async fn get_vm(&mut self, id: &str) {
        self.props("VirtualMachine", VM_PROPS, &[id.to_string()])
            .await;
    }

    /// resolve, read, the task, its end, read again: what the plugin does.
    async fn power(&mut self, id: &str, method: &str) {
        self.get_vm(id).await;
        let text = self.call(method, "VirtualMachine", id, "").await;
        let task = {
            let doc = roxmltree::Document::parse(&text).unwrap();
            doc.descendants()
                .find(|n| n.tag_name().name() == "returnval")
                .and_then(|n| n.text())
                .unwrap()
                .to_string()
        };
        self.props(
            "Task",
            &["info.state", "info.error", "info.result"],
            &[task],
        )
        .await;
        self.props("VirtualMachine", VM_PROPS, &[id.to_string()])
            .await;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let sim = VsphereSim::start(&["-dc", "4", "-cluster", "5", "-host", "20", "-vm", "100"]);
    let tmp = tempfile::tempdir().unwrap();
    let host = PluginHost::new(HostConfig {
        cache_dir: tmp.path().join("cache"),
        engine: Default::default(),
    })
    .unwrap();
    host.load(PluginSpec {
        bundle: gve_harness::plugin_bundles().join("vmware-esx"),
        grants: sim.grants(&sim.tls_pin()),
        limits: Limits {
            call_timeout_ms: 60_000,
            ..Default::default()
        },
    })
    .await
    .unwrap();
    let creds = gve::plugin::bindings::types::Credentials {
        username: Some(vsphere::USERNAME.into()),
        password: Some(vsphere::PASSWORD.into()),
        token: None,
    };
    let gve_driver = host
        .open_driver("vmware-esx", &sim.url, creds)
        .await
        .unwrap();
    let mut keep = Direct::login(&sim.url, &sim.thumbprint, false).await;
    let mut fresh = Direct::login(&sim.url, &sim.thumbprint, true).await;

    // The inventory, alternating the three paths.
    let (mut l_gve, mut l_keep, mut l_fresh) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..LIST_ROUNDS {
        let t = Instant::now();
        let n = gve_driver.list_vms().await.unwrap().len();
        l_gve.push(t.elapsed());
        assert_eq!(n, 2400);
        let t = Instant::now();
        assert_eq!(keep.list_vms().await, 2400);
        l_keep.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(fresh.list_vms().await, 2400);
        l_fresh.push(t.elapsed());
    }

    // One VM of the inventory, stopped first.
    let vm = gve_driver
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.name == "DC0_H0_VM0")
        .unwrap();
    let _ = gve_driver.shutdown(&vm.id, true).await;
    let (mut g_gve, mut g_keep, mut g_fresh) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p_gve, mut p_keep, mut p_fresh) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..OP_ROUNDS {
        let t = Instant::now();
        gve_driver.get_vm(&vm.id).await.unwrap();
        g_gve.push(t.elapsed());
        let t = Instant::now();
        keep.get_vm(&vm.id).await;
        g_keep.push(t.elapsed());
        let t = Instant::now();
        fresh.get_vm(&vm.id).await;
        g_fresh.push(t.elapsed());

        let t = Instant::now();
        gve_driver.start(&vm.id).await.unwrap();
        gve_driver.shutdown(&vm.id, true).await.unwrap();
        p_gve.push(t.elapsed());
        let t = Instant::now();
        keep.power(&vm.id, "PowerOnVM_Task").await;
        keep.power(&vm.id, "PowerOffVM_Task").await;
        p_keep.push(t.elapsed());
        let t = Instant::now();
        fresh.power(&vm.id, "PowerOnVM_Task").await;
        fresh.power(&vm.id, "PowerOffVM_Task").await;
        p_fresh.push(t.elapsed());
    }

    let rows = [
        (
            "list-vms (2,400 VMs, 404 hosts)",
            median(l_gve),
            median(l_keep),
            median(l_fresh),
            31,
        ),
        ("get-vm", median(g_gve), median(g_keep), median(g_fresh), 1),
        (
            "start + forced shutdown",
            median(p_gve),
            median(p_keep),
            median(p_fresh),
            8,
        ),
    ];
    let mut out =
        String::from("# vmware-esx: through gve vs the same SOAP calls made directly\n\n");
    out.push_str(&format!(
        "Measured {} on {} cores against the project's vSphere simulator (govmomi 0.24.2,\n\
         `-dc 4 -cluster 5 -host 20 -vm 100`: 404 hosts, 2,400 VMs), TLS pinned on both paths.\n\
         Medians of {LIST_ROUNDS} listings and {OP_ROUNDS} operations, the paths alternating.\n\
         Produced by `bash bench/run.sh vsphere`.\n\n",
        date(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    ));
    out.push_str("| operation | SOAP calls | gve (plugin) | direct, keep-alive | direct, a connection per call | added vs keep-alive | added vs a connection per call |\n|---|---|---|---|---|---|---|\n");
    for (name, g, k, f, calls) in rows {
        let pct = |base: Duration| {
            let added = g.as_secs_f64() - base.as_secs_f64();
            format!(
                "{:+.1} ms ({:+.0}%)",
                added * 1000.0,
                100.0 * added / base.as_secs_f64()
            )
        };
        out.push_str(&format!(
            "| {name} | {calls} | {} | {} | {} | {} | {} |\n",
            ms(g),
            ms(k),
            ms(f),
            pct(k),
            pct(f)
        ));
    }
    out.push_str(
        "\nThe gve path runs the driver in its sandbox: every SOAP request crosses wasi:http into the\n\
         plugin host, which checks the grant, reuses an idle connection or opens one (TCP and TLS,\n\
         verified against the pin) and streams the reply back into the plugin, which parses it with\n\
         roxmltree in WebAssembly. The direct client sends the same requests, natively.\n",
    );
    std::fs::write(gve_harness::root().join("bench/results/vsphere.md"), &out).unwrap();
    print!("{out}");
    drop(gve_driver);
}

fn date() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
