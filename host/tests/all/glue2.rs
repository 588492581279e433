//! GLUE 2 publication (`GET /v1/glue2`): the document of a real site with memory
//! agents validates against the official GLUE 2.0 JSON schema (kept unmodified in
//! `third_party/ogf-glue-json`), its numbers follow the site, and the free memory it
//! promises is exactly what placement grants.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gve::api::client::Client;
use gve::site::model::{JobState, SiteVm};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::site::{env, job};

const ID_BASE: &str = "http://schemas.ogf.org/glue/2014/11/spec_2.0_r1/";

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../third_party/ogf-glue-json")
}

/// A validator of whole GLUE 2 documents (`Glue2.json`), every schema file
/// registered under its id. The files are checked against the digests taken with
/// them first: an edited copy would make this test prove nothing.
pub fn glue2_validator() -> jsonschema::Validator {
    let dir = schema_dir();
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut resources = Vec::new();
    for line in sums.lines() {
        let (digest, file) = line.split_once("  ").unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            digest,
            "{file} differs from the upstream file"
        );
        let text = String::from_utf8(bytes).unwrap();
        // The one upstream defect a validator cannot compile: draft-04 has no type
        // "float"; its word is "number" (see third_party/ogf-glue-json/SOURCE.md).
        let text = text.replace("\"type\": \"float\"", "\"type\": \"number\"");
        let schema: Value = serde_json::from_str(&text).unwrap();
        let id = schema["id"].as_str().unwrap().to_string();
        assert!(id.starts_with(ID_BASE), "{file}: {id}");
        resources.push((id, schema));
    }
    assert_eq!(resources.len(), 35, "every schema file is listed");
    let root = resources
        .iter()
        .find(|(id, _)| id.ends_with("/Glue2.json"))
        .unwrap()
        .1
        .clone();
    let mut registry = jsonschema::Registry::new();
    for (id, schema) in resources {
        registry = registry
            .add(id.as_str(), jsonschema::Resource::from_contents(schema))
            .unwrap();
    }
    let registry = registry.prepare().unwrap();
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .with_registry(&registry)
        .build(&root)
        .unwrap()
}

/// Every way `doc` breaks the schema, one line each.
pub fn violations(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// The site's document, once `want` holds for it (up to 20 s).
async fn glue2_when(c: &Client, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let doc: Value = c.get("/v1/glue2").await.unwrap();
        if want(&doc) {
            return doc;
        }
        assert!(Instant::now() < end, "{what}: {doc:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn environment<'a>(doc: &'a Value, template: &str) -> &'a Value {
    doc["ExecutionEnvironment"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Name"] == template)
        .unwrap_or_else(|| panic!("no ExecutionEnvironment {template}: {doc:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sites_glue2_document_validates_and_tells_the_truth_about_capacity() {
    let validator = glue2_validator();
    // The validator is not a rubber stamp: the repository's own example validates
    // and a document missing a required attribute does not.
    let mut broken = json!({ "ExecutionEnvironment": [{
        "ID": "urn:x", "Platform": "amd64", "MainMemorySize": 1, "OSFamily": "linux",
        "ConnectivityIn": null, "ConnectivityOut": null,
        "Associations": { "ManagerID": "urn:m" },
    }]});
    assert_eq!(violations(&validator, &broken), Vec::<String>::new());
    broken["ExecutionEnvironment"][0]
        .as_object_mut()
        .unwrap()
        .remove("OSFamily");
    assert!(!violations(&validator, &broken).is_empty());
    broken["ExecutionEnvironment"][0]["OSFamily"] = json!(7);
    assert!(!violations(&validator, &broken).is_empty());

    let e = env(2, |c| {
        c.site_id = "glue-test".into();
        c.public_url = Some("https://vms.example.org:7080/".into());
        c.quality_level = "testing".into();
    })
    .await;
    let big = json!({ "logical-cpus": 1000, "main-memory-mib": 100_000_000, "vms": 100 });
    let alice = e.user("alice", Some(big)).await;
    let doc = glue2_when(&alice, "both agents up", |d| {
        d["ComputingShare"][0]["Extension"]["AgentsUp"] == 2
            && d["ExecutionEnvironment"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(
        violations(&validator, &doc),
        Vec::<String>::new(),
        "{doc:#}"
    );
    let service = &doc["ComputingService"][0];
    assert_eq!(
        (&service["ID"], &service["QualityLevel"]),
        (
            &json!("urn:glue2:ComputingService:glue-test"),
            &json!("testing")
        )
    );
    let endpoint = &doc["ComputingEndpoint"][0];
    assert_eq!(endpoint["URL"], "https://vms.example.org:7080");
    assert_eq!(
        (&endpoint["HealthState"], &endpoint["ServingState"]),
        (&json!("ok"), &json!("production"))
    );
    let debian = environment(&doc, "debian-12");
    assert_eq!(
        (
            &debian["LogicalCPUs"],
            &debian["MainMemorySize"],
            &debian["OSFamily"],
            &debian["OSName"],
            &debian["Platform"],
            &debian["UsedInstances"],
        ),
        (
            &json!(2),
            &json!(2048),
            &json!("linux"),
            &json!("debian"),
            &json!("amd64"),
            &json!(0)
        )
    );
    let handles: Vec<&Value> = doc["ApplicationHandle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["Value"])
        .collect();
    assert_eq!(handles, [&json!("alpine-3"), &json!("debian-12")]);

    // A VM held by alice is a used instance and takes its memory off the room.
    let free = debian["Extension"]["FreeMainMemory"].as_u64().unwrap();
    let j = job(
        &alice,
        "/v1/vms",
        json!({ "template": "debian-12", "logical-cpus": 1, "main-memory-mib": 1024 }),
    )
    .await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let vm: SiteVm = serde_json::from_value(j.result.unwrap()).unwrap();
    let doc: Value = alice.get("/v1/glue2").await.unwrap();
    assert_eq!(violations(&validator, &doc), Vec::<String>::new());
    let debian = environment(&doc, "debian-12");
    assert_eq!(debian["UsedInstances"], 1, "{debian:#}");
    assert_eq!(doc["ComputingShare"][0]["UsedSlots"], 1);
    let rooms_sum_before = free; // both agents had the same room; one lost 1024 MiB
    assert_eq!(
        debian["Extension"]["FreeMainMemory"].as_u64().unwrap(),
        rooms_sum_before,
        "the other agent still has all its room"
    );
    assert_eq!(
        doc["ComputingShare"][0]["Extension"]["FreeMainMemory"]
            .as_u64()
            .unwrap(),
        2 * free - 1024
    );

    // What the document promises is what placement grants: one MiB more than the
    // room it publishes is refused, exactly the room is granted.
    let room = debian["Extension"]["FreeMainMemory"].as_u64().unwrap();
    let too_big = job(
        &alice,
        "/v1/vms",
        json!({ "template": "debian-12", "logical-cpus": 1, "main-memory-mib": room + 1 }),
    )
    .await;
    assert_eq!(too_big.state, JobState::Failed, "{too_big:?}");
    let fits = job(
        &alice,
        "/v1/vms",
        json!({ "template": "debian-12", "logical-cpus": 1, "main-memory-mib": room }),
    )
    .await;
    assert_eq!(fits.state, JobState::Succeeded, "{fits:?}");
    let doc: Value = alice.get("/v1/glue2").await.unwrap();
    assert_eq!(environment(&doc, "debian-12")["UsedInstances"], 2);
    assert_eq!(
        environment(&doc, "debian-12")["Extension"]["FreeMainMemory"],
        free - 1024,
        "the agent with room left is the one holding the first VM"
    );

    // The agent holding the first VM goes away: the endpoint warns, that VM is an
    // unavailable instance, and the document still validates.
    let mut e = e;
    let index: usize = vm.agent.trim_start_matches("a-").parse().unwrap();
    let (agent, _) = e.agents.remove(index);
    agent.stop().await;
    let doc = glue2_when(&alice, "the agent down", |d| {
        d["ComputingEndpoint"][0]["HealthState"] == "warning"
    })
    .await;
    assert_eq!(
        violations(&validator, &doc),
        Vec::<String>::new(),
        "{doc:#}"
    );
    let info = doc["ComputingEndpoint"][0]["HealthStateInfo"]
        .as_str()
        .unwrap();
    assert_eq!(
        info, "1 of 2 agents down",
        "counts only: agent ids are for admins"
    );
    let debian = environment(&doc, "debian-12");
    assert_eq!(
        (&debian["UsedInstances"], &debian["UnavailableInstances"]),
        (&json!(1), &json!(1)),
        "{debian:#}"
    );
    assert_eq!(doc["ComputingShare"][0]["Extension"]["AgentsUp"], 1);
    e.site.stop().await;
}
