//! A logged-in connection with what the driver and guest sessions both need: VMs
//! found by id or name, host ids named, and where new VMs go.

use std::collections::{BTreeMap, HashMap};

use gve_sdk::{Credentials, Error, Result, VmInfo};

use crate::props::{self, Objects};
use crate::settings::Settings;
use crate::soap::{Client, Endpoint};
use crate::vm::{self, Record};
use crate::xml::MoRef;

/// Where a new VM goes.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The datacenter's VM folder.
    pub folder: MoRef,
    /// The resource pool.
    pub pool: MoRef,
    /// The datastore's name (for `[name]` paths).
    pub datastore: String,
}

/// A session's connection, settings and caches (the server stays the truth: every
/// cached entry is checked before it is used).
pub struct Conn {
    /// The SOAP session.
    pub client: Client,
    /// The operator's values.
    pub settings: Settings,
    hosts: BTreeMap<String, String>,
    names: HashMap<String, MoRef>,
}

impl Conn {
    /// Connects and logs in to `endpoint` with the username and password of `credentials`.
    pub fn open(endpoint: &str, credentials: Credentials) -> Result<Conn> {
        let settings = Settings::read()?;
        let ep = Endpoint::parse(
            endpoint,
            credentials.username.unwrap_or_default(),
            credentials.password.unwrap_or_default(),
            settings.plain_http,
            settings.request_timeout,
        )?;
        Ok(Conn {
            client: Client::connect(ep)?,
            settings,
            hosts: BTreeMap::new(),
            names: HashMap::new(),
        })
    }

    /// Host ids → names, read again when `id` is not among them.
    pub fn host_names(&mut self, id: Option<&MoRef>) -> Result<&BTreeMap<String, String>> {
        let stale = match id {
            Some(h) => !self.hosts.contains_key(&h.value),
            None => self.hosts.is_empty(),
        };
        if stale {
            let mut hosts = BTreeMap::new();
            props::retrieve(
                &mut self.client,
                "HostSystem",
                &["name"],
                Objects::All,
                |id, p| {
                    hosts.insert(id.value, props::text(p, "name").unwrap_or("").to_string());
                    Ok(())
                },
            )?;
            self.hosts = hosts;
        }
        Ok(&self.hosts)
    }

    /// The VM or template `vm` names: a managed object id or a display name. Unknown
    /// is `not-found`; a name several VMs share is `invalid-argument` (use the id).
    pub fn resolve(&mut self, vm: &str) -> Result<MoRef> {
        if vm.is_empty() {
            return Err(Error::invalid_argument(
                "no VM named: the id or name is empty",
            ));
        }
        if looks_like_id(vm) {
            let id = MoRef::new("VirtualMachine", vm);
            match self.name_of(&id) {
                Ok(_) => return Ok(id),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(id) = self.names.get(vm).cloned() {
            match self.name_of(&id) {
                Ok(n) if n == vm => return Ok(id),
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let mut matches = Vec::new();
        let mut names = HashMap::new();
        props::retrieve(
            &mut self.client,
            "VirtualMachine",
            &["name"],
            Objects::All,
            |id, p| {
                let name = props::text(p, "name").unwrap_or("");
                if name == vm {
                    matches.push(id.clone());
                }
                names.insert(name.to_string(), id);
                Ok(())
            },
        )?;
        self.names = names;
        match matches.len() {
            0 => Err(Error::not_found(format!(
                "no VM or template with id or name '{vm}' at {}",
                self.client.endpoint.url
            ))),
            1 => Ok(matches.remove(0)),
            n => Err(Error::invalid_argument(format!(
                "{n} VMs are named '{vm}' at {}; name one by its id",
                self.client.endpoint.url
            ))),
        }
    }

    /// The record of the VM or template `vm` names (id or name): one request when
    /// it is an id, as [`Conn::resolve`] then [`Conn::record`] otherwise.
    pub fn find(&mut self, vm: &str) -> Result<Record> {
        if looks_like_id(vm) {
            match self.record(&MoRef::new("VirtualMachine", vm)) {
                Err(Error::NotFound(_)) => {}
                r => return r,
            }
        }
        let id = self.resolve(vm)?;
        self.record(&id)
    }

    /// Whether some VM or template is named `name` already.
    pub fn name_taken(&mut self, name: &str) -> Result<bool> {
        match self.resolve(name) {
            Ok(id) => Ok(id.value != name || self.name_of(&id)? == name),
            Err(Error::NotFound(_)) => Ok(false),
            Err(Error::InvalidArgument(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn name_of(&mut self, id: &MoRef) -> Result<String> {
        let mut name = String::new();
        props::one(&mut self.client, id, &["name"], |p| {
            name = props::text(p, "name").unwrap_or("").to_string();
            Ok(())
        })?;
        Ok(name)
    }

    /// What the server says of one VM.
    pub fn record(&mut self, id: &MoRef) -> Result<Record> {
        let mut rec = None;
        props::one(&mut self.client, id, vm::PROPS, |p| {
            rec = Some(Record::read(id.clone(), p));
            Ok(())
        })?;
        rec.ok_or_else(|| Error::not_found(format!("VM {} does not exist", id.value)))
    }

    /// The contract's view of one VM.
    pub fn info(&mut self, id: &MoRef) -> Result<VmInfo> {
        let rec = self.record(id)?;
        Ok(rec.info(self.host_names(rec.host.as_ref())?))
    }

    /// Every VM and template, page by page, as records.
    pub fn records(&mut self, mut each: impl FnMut(Record)) -> Result<()> {
        props::retrieve(
            &mut self.client,
            "VirtualMachine",
            vm::PROPS,
            Objects::All,
            |id, p| {
                each(Record::read(id, p));
                Ok(())
            },
        )
    }

    /// Every VM (`templates` false) or every template, as the contract sees them.
    pub fn list(&mut self, templates: bool) -> Result<Vec<VmInfo>> {
        let mut recs = Vec::new();
        self.records(|r| {
            if r.template == templates {
                recs.push(r);
            }
        })?;
        let mut hosts = self.host_names(None)?;
        if recs.iter().any(|r| {
            r.host
                .as_ref()
                .is_some_and(|h| !hosts.contains_key(&h.value))
        }) {
            // A host added since the names were read: read them again.
            self.hosts.clear();
            hosts = self.host_names(None)?;
        }
        Ok(recs.iter().map(|r| r.info(hosts)).collect())
    }

    /// The host `dest` names (an id like `host-21` or its name).
    pub fn host(&mut self, dest: &str) -> Result<MoRef> {
        self.hosts.clear();
        let hosts = self.host_names(None)?;
        hosts
            .iter()
            .find(|(id, name)| id.as_str() == dest || name.as_str() == dest)
            .map(|(id, _)| MoRef::new("HostSystem", id.clone()))
            .ok_or_else(|| {
                Error::not_found(format!("no host with id or name '{dest}' at this endpoint"))
            })
    }

    /// The resource pool of the compute resource `host` belongs to.
    pub fn pool_of_host(&mut self, host: &MoRef) -> Result<MoRef> {
        let mut parent = None;
        props::one(&mut self.client, host, &["parent"], |p| {
            parent = props::moref(p, "parent");
            Ok(())
        })?;
        let parent =
            parent.ok_or_else(|| Error::backend(format!("host {} has no parent", host.value)))?;
        let mut pool = None;
        props::one(&mut self.client, &parent, &["resourcePool"], |p| {
            pool = props::moref(p, "resourcePool");
            Ok(())
        })?;
        pool.ok_or_else(|| {
            Error::backend(format!(
                "{} {} has no resource pool",
                parent.kind, parent.value
            ))
        })
    }

    /// The reference property `prop` of the first object of `kind` that has one.
    fn first(&mut self, kind: &str, prop: &str) -> Result<Option<MoRef>> {
        let mut found = None;
        props::retrieve(&mut self.client, kind, &[prop], Objects::All, |_, p| {
            if found.is_none() {
                found = props::moref(p, prop);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Where new VMs go: the operator's pool and datastore, else the first ones found.
    pub fn placement(&mut self) -> Result<Placement> {
        let folder = self
            .first("Datacenter", "vmFolder")?
            .ok_or_else(|| Error::backend("the endpoint has no datacenter"))?;
        let pool = match &self.settings.resource_pool {
            Some(id) => MoRef::new("ResourcePool", id.clone()),
            None => self
                .first("ComputeResource", "resourcePool")?
                .ok_or_else(|| Error::backend("the endpoint has no resource pool"))?,
        };
        let datastore = match &self.settings.datastore {
            Some(d) => d.clone(),
            None => {
                let mut ds = None;
                props::retrieve(
                    &mut self.client,
                    "Datastore",
                    &["name", "summary.accessible"],
                    Objects::All,
                    |_, p| {
                        if ds.is_none() && props::text(p, "summary.accessible") != Some("false") {
                            ds = props::text(p, "name").map(str::to_string);
                        }
                        Ok(())
                    },
                )?;
                ds.ok_or_else(|| Error::backend("the endpoint has no accessible datastore"))?
            }
        };
        Ok(Placement {
            folder,
            pool,
            datastore,
        })
    }
}

/// Whether `s` has the form of a VM's managed object id (`vm-57`, or ESXi's `57`).
pub fn looks_like_id(s: &str) -> bool {
    let digits = s.strip_prefix("vm-").unwrap_or(s);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}
