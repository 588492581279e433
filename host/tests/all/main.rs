//! Integration tests of the gve crate: one binary, a module per area.

mod admin;
mod agent;
mod agent_crash;
mod audit;
mod cli;
mod contract;
mod e2e;
mod fairness;
mod guest;
mod hostile;
mod http_limits;
mod isolation;
mod kvm;
mod lifecycle;
mod proxy;
mod races;
mod site;
mod site_crash;
mod storage;
mod support;
mod tenancy;
mod tls;
mod up;
mod vmware;
mod xen;
mod xen_migrate;
