//! Benchmark mode: the latency of each operation on the target, p50 and p99, over
//! a number of rounds. Each round reads (host-info, list-vms) and, when the driver
//! declares them, makes a VM, reads it (get-vm) and takes it through start, a forced
//! shutdown and destroy; everything made is named for the run and removed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gve::plugin::bindings::types::Capabilities as C;
use serde::{Deserialize, Serialize};

use crate::ctx::Ctx;

/// The latency of one operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Latency {
    /// Contract operation.
    pub op: String,
    /// Calls measured.
    pub samples: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Calls that failed (not counted in the percentiles).
    pub failed: usize,
}

#[derive(Default)]
struct Samples(BTreeMap<&'static str, (Vec<Duration>, usize)>);

impl Samples {
    async fn time<T, E>(
        &mut self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        let t = Instant::now();
        let r = call.await;
        let entry = self.0.entry(op).or_default();
        match r {
            Ok(v) => {
                entry.0.push(t.elapsed());
                Some(v)
            }
            Err(_) => {
                entry.1 += 1;
                None
            }
        }
    }
}

/// The `q` quantile of sorted `d`, ms (nearest rank).
fn quantile(d: &[Duration], q: f64) -> f64 {
    if d.is_empty() {
        return 0.0;
    }
    let rank = ((q * d.len() as f64).ceil() as usize).clamp(1, d.len());
    d[rank - 1].as_secs_f64() * 1000.0
}

/// Runs `rounds` rounds against the context's driver.
pub async fn run(ctx: &Ctx, rounds: u32) -> Vec<Latency> {
    let mut s = Samples::default();
    let lifecycle = ctx
        .info
        .capabilities
        .contains(C::CREATE | C::START | C::SHUTDOWN | C::DESTROY);
    for i in 0..rounds {
        let d = &ctx.driver;
        s.time("host-info", d.host_info()).await;
        s.time("list-vms", d.list_vms()).await;
        if !lifecycle {
            continue;
        }
        let profile = ctx.profile(&format!("bench-{i}"));
        let Some(vm) = s.time("create", d.create(&profile)).await else {
            continue;
        };
        ctx.made(crate::ctx::Side::First, &vm.id);
        s.time("get-vm", d.get_vm(&vm.id)).await;
        if s.time("start", d.start(&vm.id)).await.is_some() {
            s.time("shutdown (force)", d.shutdown(&vm.id, true)).await;
        }
        s.time("destroy", d.destroy(&vm.id)).await;
        ctx.cleanup().await;
    }
    s.0.into_iter()
        .map(|(op, (mut d, failed))| {
            d.sort();
            Latency {
                op: op.into(),
                samples: d.len(),
                p50_ms: quantile(&d, 0.5),
                p99_ms: quantile(&d, 0.99),
                failed,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&d, 0.5), 50.0);
        assert_eq!(quantile(&d, 0.99), 99.0);
        assert_eq!(quantile(&d[..1], 0.99), 1.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
