//! Asynchronous jobs: submitted (recorded `queued`, with the quota they need reserved
//! in the same transaction) and answered with an id at once; run by a bounded pool of
//! runners; finished (succeeded with a result, failed with a typed error) in one
//! transaction with the usage they move.
//!
//! Submissions go through one writer thread that commits them in batches (group
//! commit): each batch is one durable transaction, checked submission by submission,
//! so N concurrent requests can never push a user over quota and the site accepts
//! thousands of durable submissions per second. A restarted site resumes every job
//! that was queued or running; each agent call a job makes carries an idempotency
//! key derived from the job, so a resumed job never runs an operation twice.

use std::sync::Arc;

use hyper::StatusCode;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::agents::db;
use super::model::{now_ms, Job, JobKind, JobState, OpError, Quota, Usage};
use super::store::{Store, StoreError};
use super::SiteCore;
use crate::api::ApiError;

/// Most submissions committed in one transaction.
const MAX_BATCH: usize = 1024;

/// A job to record, with the quota its owner must stay within.
struct Submission {
    job: Job,
    quota: Option<Quota>,
    reply: oneshot::Sender<Result<Job, ApiError>>,
}

/// Hands submissions to the writer thread.
#[derive(Clone)]
pub struct Submitter {
    tx: std::sync::mpsc::Sender<Submission>,
}

/// A new job id: time-ordered, unique.
pub fn new_job_id() -> String {
    let r = uuid::Uuid::new_v4().simple().to_string();
    format!("job-{:012x}-{}", now_ms(), &r[..12])
}

/// A queued job of `kind` for `owner`.
pub fn new_job(owner: &str, kind: JobKind, vm: Option<String>, params: Value) -> Job {
    let now = now_ms();
    Job {
        id: new_job_id(),
        owner: owner.to_string(),
        kind,
        vm,
        params,
        state: JobState::Queued,
        step: Value::Null,
        reserved: Usage::default(),
        result: None,
        error: None,
        created_ms: now,
        updated_ms: now,
    }
}

impl Submitter {
    /// Starts the writer thread; accepted jobs' ids go to `run`.
    pub fn start(store: Store, run: mpsc::UnboundedSender<String>) -> Submitter {
        let (tx, rx) = std::sync::mpsc::channel::<Submission>();
        std::thread::Builder::new()
            .name("gve-site-jobs".into())
            .spawn(move || writer(store, rx, run))
            .expect("spawn the job writer thread");
        Submitter { tx }
    }

    /// Records `job` durably (checking `quota` against its reservation) and queues it.
    pub async fn submit(&self, job: Job, quota: Option<Quota>) -> Result<Job, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission { job, quota, reply })
            .map_err(|_| unavailable("the job writer has stopped"))?;
        rx.await
            .map_err(|_| unavailable("the job writer has stopped"))?
    }
}

fn unavailable(m: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
}

fn writer(
    store: Store,
    rx: std::sync::mpsc::Receiver<Submission>,
    run: mpsc::UnboundedSender<String>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let verdicts = store.write(|t| {
            let mut verdicts = Vec::with_capacity(batch.len());
            for s in &batch {
                let job = &s.job;
                if let Some(q) = &s.quota {
                    let wanted = t.usage(&job.owner)?.plus(job.reserved);
                    if let Some(over) = wanted.exceeds(q) {
                        verdicts.push(Err(ApiError::new(
                            StatusCode::FORBIDDEN,
                            "denied",
                            format!(
                                "quota of user '{}' exceeded: this {} would hold {over}",
                                job.owner,
                                job.kind.as_str()
                            ),
                        )));
                        continue;
                    }
                    t.set_usage(&job.owner, wanted)?;
                }
                t.put_job(job, Some("queued"))?;
                verdicts.push(Ok(()));
            }
            Ok(verdicts)
        });
        match verdicts {
            Ok(v) => {
                for (s, verdict) in batch.into_iter().zip(v) {
                    let out = verdict.map(|()| s.job.clone());
                    if out.is_ok() {
                        let _ = run.send(s.job.id.clone());
                    }
                    let _ = s.reply.send(out);
                }
            }
            Err(e) => {
                for s in batch {
                    let _ = s.reply.send(Err(db(StoreError::Storage(e.to_string()))));
                }
            }
        }
    }
}

/// Runs queued jobs, at most `parallel` at once.
pub fn spawn_runner(
    core: Arc<SiteCore>,
    mut rx: mpsc::UnboundedReceiver<String>,
    parallel: usize,
) -> tokio::task::JoinHandle<()> {
    let permits = Arc::new(Semaphore::new(parallel));
    tokio::spawn(async move {
        while let Some(id) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let core = core.clone();
            tokio::spawn(async move {
                core.run_job(&id).await;
                drop(permit);
            });
        }
    })
}

impl SiteCore {
    /// Updates a job in one durable transaction (its record, and usage via `f`).
    pub fn update_job(
        &self,
        id: &str,
        message: Option<&str>,
        f: impl FnOnce(&mut Job, &mut super::store::Txn<'_>) -> Result<(), StoreError>,
    ) -> Result<Job, StoreError> {
        self.update_job_with(true, id, message, f)
    }

    fn update_job_with(
        &self,
        durable: bool,
        id: &str,
        message: Option<&str>,
        f: impl FnOnce(&mut Job, &mut super::store::Txn<'_>) -> Result<(), StoreError>,
    ) -> Result<Job, StoreError> {
        let write = |t: &mut super::store::Txn<'_>| {
            let mut job = t
                .job(id)?
                .ok_or_else(|| StoreError::Storage(format!("job {id} vanished")))?;
            f(&mut job, t)?;
            job.updated_ms = now_ms();
            t.put_job(&job, message)?;
            Ok(job)
        };
        if durable {
            self.store.write(write)
        } else {
            self.store.write_lazy(write)
        }
    }

    /// Records a job's progress checkpoint.
    pub fn checkpoint(&self, id: &str, step: Value) -> Result<(), OpError> {
        self.update_job(id, None, |j, _| {
            j.step = step;
            Ok(())
        })
        .map(|_| ())
        .map_err(store_error)
    }

    /// Runs (or resumes) one job to its end.
    pub async fn run_job(self: &Arc<Self>, id: &str) {
        // Queued → running in one transaction, so a cancel cannot slip in between.
        // Lazily durable: a crash that undoes it leaves the job queued, and resumed.
        let started = self.store.write_lazy(|t| {
            let Some(mut j) = t.job(id)? else {
                return Ok(None);
            };
            if j.state == JobState::Queued {
                j.state = JobState::Running;
                j.updated_ms = now_ms();
                t.put_job(&j, Some("running"))?;
            }
            Ok(Some(j))
        });
        let job = match started {
            Ok(Some(j)) if !j.state.is_terminal() => j,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(job = id, "cannot start job: {e}");
                return;
            }
        };
        let outcome = self.dispatch(&job).await;
        if let Err(e) = self.finish(id, outcome) {
            tracing::error!(job = id, "cannot record the end of a job: {e}");
        }
    }

    async fn dispatch(self: &Arc<Self>, job: &Job) -> Result<Value, OpError> {
        // A job queued on a VM that has changed hands since must not touch it.
        if let (Some(id), false) = (&job.vm, job.kind == JobKind::Request) {
            if let Some(v) = self.store.vm(id).map_err(store_error)? {
                if v.owner.as_deref() != Some(job.owner.as_str()) {
                    return Err(OpError {
                        kind: "invalid-state".into(),
                        message: format!("VM {id} is no longer held by '{}'", job.owner),
                    });
                }
                if job.kind == JobKind::Expire && !v.lease.is_some_and(|l| l.expired) {
                    return Err(OpError {
                        kind: "invalid-state".into(),
                        message: format!("the lease of VM {id} was renewed by an admin"),
                    });
                }
            }
        }
        match job.kind {
            JobKind::Request => self.run_request(job).await,
            JobKind::Release => self.run_release(job).await,
            JobKind::Expire => self.run_expire(job).await,
            JobKind::CopyIn => self.run_copy_in(job).await,
            JobKind::CopyOut => self.run_copy_out(job).await,
            JobKind::Clone => self.run_clone(job).await,
            JobKind::Migrate => self.run_migrate(job).await,
            _ => self.run_action(job).await,
        }
    }

    /// Records a job's end. A job that fails gives back what it reserved; a request
    /// that failed after claiming a VM returns the VM to the pool.
    fn finish(&self, id: &str, outcome: Result<Value, OpError>) -> Result<Job, StoreError> {
        let message = match &outcome {
            Ok(_) => "succeeded".to_string(),
            Err(e) => format!("failed: {} ({})", e.message, e.kind),
        };
        // Lazily durable: a crash that undoes the end resumes the job, whose agent
        // calls answer again from their idempotency keys.
        self.update_job_with(false, id, Some(&message), |job, t| {
            // A finished job needs its secrets no more.
            scrub(&mut job.params);
            if job.reserved != Usage::default() {
                let u = t.usage(&job.owner)?;
                t.set_usage(&job.owner, u.minus(job.reserved))?;
                job.reserved = Usage::default();
            }
            match outcome {
                Ok(v) => {
                    job.state = JobState::Succeeded;
                    job.result = Some(v);
                }
                Err(e) => {
                    job.state = JobState::Failed;
                    job.error = Some(e);
                    if job.kind == JobKind::Request {
                        super::vms::unclaim_on_failure(t, job)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Cancels a queued job (giving back its reservation); running jobs finish.
    pub fn cancel(&self, id: &str) -> Result<Job, ApiError> {
        let r = self.store.write(|t| {
            let Some(mut job) = t.job(id)? else {
                return Ok(Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    format!("no job '{id}'"),
                )));
            };
            if job.state != JobState::Queued {
                return Ok(Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid-state",
                    format!(
                        "job {id} is {:?}: only queued jobs can be cancelled",
                        job.state
                    )
                    .to_lowercase(),
                )));
            }
            let u = t.usage(&job.owner)?;
            t.set_usage(&job.owner, u.minus(job.reserved))?;
            job.reserved = Usage::default();
            job.state = JobState::Cancelled;
            job.updated_ms = now_ms();
            t.put_job(&job, Some("cancelled"))?;
            Ok(Ok(job))
        });
        r.map_err(db)?
    }

    /// Queues every job a previous run left queued or running.
    pub fn resume_all(&self, run: &mpsc::UnboundedSender<String>) -> Result<usize, StoreError> {
        let jobs = self.store.active_jobs()?;
        for j in &jobs {
            let _ = run.send(j.id.clone());
        }
        Ok(jobs.len())
    }
}

/// `job` as users see it: environment values and stdin of a command are secrets
/// (they stay in the database only until the job ends).
pub fn redacted(mut job: Job) -> Job {
    scrub(&mut job.params);
    job
}

fn scrub(params: &mut Value) {
    if let Some(env) = params.get_mut("env").and_then(Value::as_object_mut) {
        for v in env.values_mut() {
            *v = Value::String("(redacted)".into());
        }
    }
    if let Some(obj) = params.as_object_mut() {
        if let Some(stdin) = obj.remove("stdin-b64") {
            let n = stdin.as_str().map(|s| s.len() / 4 * 3).unwrap_or(0);
            obj.insert("stdin-bytes".into(), Value::from(n));
        }
    }
}

/// A database failure as a job error.
pub fn store_error(e: StoreError) -> OpError {
    OpError {
        kind: "backend".into(),
        message: e.to_string(),
    }
}
