//! Asynchronous jobs: submitted (recorded `queued`, with the quota they need reserved
//! in the same transaction) and answered with an id at once; run by a bounded pool of
//! runners; finished (succeeded with a result, failed with a typed error) in one
//! transaction with the usage they move.
//!
//! Submissions go through one writer thread that commits them in batches (group
//! commit): each batch is one transaction (piece by piece should one change
//! fail), durable before anything in it is answered or published unless every
//! change in it is lazy, checked submission by submission,
//! so N concurrent requests can never push a user over quota and the site accepts
//! thousands of durable submissions per second. A restarted site resumes every job
//! that was queued or running; each agent call a job makes carries an idempotency
//! key derived from the job, so a resumed job never runs an operation twice.
//!
//! A job whose owner has a run slot free, with nobody waiting for one, is
//! recorded `running` in its submission's transaction and handed to a runner
//! at once (no second write before it runs; one such start per owner and
//! batch, as the turns would give). A command in a guest so started, in a
//! batch of nothing but such commands and lazy changes, runs while its batch
//! reaches the disk, as an agent's operation does; every other job runs once
//! its submission is durable.

use std::sync::Arc;

use hyper::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;

use super::agents::db;
use super::model::{now_ms, AuditEntry, Job, JobKind, JobState, OpError, Quota, Usage};
use super::scheduler::{start_batch, Lane, Scheduler, Ticket};
use super::store::{Store, StoreError, Txn};
use super::SiteCore;
use crate::api::ApiError;

/// Most submissions committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Beyond a command's own budget, time for reaching the agent, waiting for its
/// guest agent and fetching the result, seconds.
const EXEC_GRACE_S: u64 = 180;

/// A job to record, with the quota its owner must stay within.
struct Submission {
    job: Job,
    quota: Option<Quota>,
    /// Recorded in the same transaction as the job.
    audit: Option<AuditEntry>,
    /// Its place in its owner's queue, until the job is queued.
    ticket: Option<Ticket>,
    /// The ticket took a run slot: the job is recorded `running` at once.
    started: bool,
    reply: oneshot::Sender<Result<Job, ApiError>>,
}

/// A change to commit durably, in the next batch; it may run twice (alone, after
/// another change of its batch failed), so it is `FnMut`.
type Change = Box<dyn FnMut(&mut Txn<'_>) -> Result<(), StoreError> + Send>;

/// What the writer thread commits.
enum Work {
    /// A new job.
    Submit(Box<Submission>),
    /// Any other change (a job's end), durable before its events are published
    /// and before anyone can read it, unless `lazy`.
    Apply {
        change: Change,
        /// A change a crash may undo (a job's `running`): a batch of only such
        /// changes is committed without waiting for the disk; any other in the
        /// batch makes it durable with them.
        lazy: bool,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Work {
    fn lazy(&self) -> bool {
        matches!(self, Work::Apply { lazy: true, .. })
    }
}

/// Hands submissions and other durable changes to the writer thread, which
/// group-commits them.
#[derive(Clone)]
pub struct Submitter {
    tx: std::sync::mpsc::Sender<Work>,
    sched: Arc<Scheduler>,
    disk: Arc<super::retention::DiskGuard>,
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
    /// Starts the writer thread; accepted jobs are queued on `sched`.
    pub fn start(
        store: Store,
        sched: Arc<Scheduler>,
        disk: Arc<super::retention::DiskGuard>,
    ) -> Submitter {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let run = sched.clone();
        std::thread::Builder::new()
            .name("gve-site-jobs".into())
            .spawn(move || writer(store, rx, run))
            .expect("spawn the job writer thread");
        Submitter { tx, sched, disk }
    }

    /// Records `job` durably (checking `quota` against its reservation) and queues it.
    pub async fn submit(&self, job: Job, quota: Option<Quota>) -> Result<Job, ApiError> {
        self.submit_audited(job, quota, None).await
    }

    /// [`Submitter::submit`], with an audit entry recorded in the same transaction.
    pub async fn submit_audited(
        &self,
        job: Job,
        quota: Option<Quota>,
        audit: Option<AuditEntry>,
    ) -> Result<Job, ApiError> {
        // Room on disk and a place in the owner's queue first: either missing is
        // refused before anything is written.
        self.disk.check()?;
        let ticket = self.sched.admit(&job.owner)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Work::Submit(Box::new(Submission {
                job,
                quota,
                audit,
                ticket: Some(ticket),
                started: false,
                reply,
            })))
            .map_err(|_| unavailable("the job writer has stopped"))?;
        rx.await
            .map_err(|_| unavailable("the job writer has stopped"))?
    }

    /// Commits `change` durably in the next group commit; returns once it is on
    /// disk (a reader sees it no sooner than that).
    pub async fn apply(
        &self,
        change: impl FnMut(&mut Txn<'_>) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        self.send(Box::new(change), false).await
    }

    /// Runs `change` in the next group commit and returns what it returned: on
    /// disk when the call returns, unless `lazy`, which is seen at once and
    /// reaches the disk with the next durable commit. Lazy is only for a change
    /// a crash may undo safely, one a restarted site derives again (a job's
    /// `running`: a resumed job is queued again; see [`Store::write_lazy`]).
    pub async fn run<T: Send + 'static>(
        &self,
        lazy: bool,
        mut change: impl FnMut(&mut Txn<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let out = Arc::new(std::sync::Mutex::new(None));
        let put = out.clone();
        self.send(
            Box::new(move |t: &mut Txn<'_>| {
                let v = change(t)?;
                *put.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
                Ok(())
            }),
            lazy,
        )
        .await?;
        let v = out.lock().unwrap_or_else(|p| p.into_inner()).take();
        v.ok_or_else(|| StoreError::Storage("a committed change left no result".into()))
    }

    async fn send(&self, change: Change, lazy: bool) -> Result<(), StoreError> {
        let stopped = || StoreError::Storage("the job writer has stopped".into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Work::Apply {
                change,
                lazy,
                reply,
            })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn unavailable(m: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
}

fn writer(store: Store, rx: std::sync::mpsc::Receiver<Work>, run: Arc<Scheduler>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // A job that can run at once is recorded `running` with its submission;
        // one per owner and batch, as the turns between users would give.
        start_batch(batch.iter_mut().filter_map(|w| match w {
            Work::Submit(s) => s.ticket.as_mut(),
            Work::Apply { .. } => None,
        }));
        for w in batch.iter_mut() {
            if let Work::Submit(s) = w {
                s.started = s.ticket.as_ref().is_some_and(Ticket::started);
            }
        }
        // Commands in guests that start at once run while their batch reaches
        // the disk, as an agent's operations do: nothing is answered, and no
        // event published, before the batch is durable. Only a batch of such
        // commands and lazy changes: another's change would be readable before
        // it is durable. A crash within that one disk write loses the jobs (and
        // their audit entries) with nobody told of them; the agent's audit of
        // a command is its own. Anything else runs once it is durable.
        let early = batch.iter().any(|w| !w.lazy())
            && batch.iter().all(|w| match w {
                Work::Submit(s) => s.started && s.job.kind == JobKind::Exec,
                Work::Apply { lazy, .. } => *lazy,
            });
        // One transaction for the batch, durable unless every change in it is
        // lazy (or its sync follows); should one change fail, each is committed
        // on its own so the others are not lost with it. (A commit that fails in
        // redb may yet be on disk, and redb then refuses further writes: the
        // changes are answered with errors and a restart finds what is on disk.)
        let durable = !batch.iter().all(Work::lazy);
        let mut events = Vec::new();
        let together = store.commit_holding(durable && !early, |t| {
            batch
                .iter_mut()
                .map(|w| apply(t, w))
                .collect::<Result<Vec<_>, _>>()
        });
        let mut verdicts = match together {
            Ok((v, evs)) => {
                events = evs;
                v
            }
            Err(_) => batch
                .iter_mut()
                .map(
                    |w| match store.commit_holding(!w.lazy() && !early, |t| apply(t, w)) {
                        Ok((v, evs)) => {
                            events.extend(evs);
                            v
                        }
                        Err(e) => Verdict::Failed(e.to_string()),
                    },
                )
                .collect(),
        };
        if early {
            for (w, verdict) in batch.iter_mut().zip(&verdicts) {
                if let (Work::Submit(s), Verdict::Done) = (w, verdict) {
                    if let Some(t) = s.ticket.take() {
                        run.enqueue(t, s.job.id.clone());
                    }
                }
            }
            // A sync that fails answers the batch with its error, and publishes
            // nothing of it, though its commands run: redb refuses every write
            // after it, and a restart finds what is on disk.
            if let Err(e) = store.commit_to(true, |_| Ok(())) {
                events.clear();
                for v in verdicts.iter_mut() {
                    if matches!(v, Verdict::Done) {
                        *v = Verdict::Failed(e.to_string());
                    }
                }
            }
        }
        store.publish(events);
        for (w, verdict) in batch.into_iter().zip(verdicts) {
            match w {
                Work::Submit(s) => {
                    let mut s = *s;
                    let out = match verdict {
                        Verdict::Done => {
                            if s.started {
                                s.job.state = JobState::Running;
                            }
                            if let Some(t) = s.ticket.take() {
                                run.enqueue(t, s.job.id.clone());
                            }
                            Ok(s.job)
                        }
                        Verdict::Refused(e) => Err(e),
                        Verdict::Failed(m) => Err(db(StoreError::Storage(m))),
                    };
                    let _ = s.reply.send(out);
                }
                Work::Apply { reply, .. } => {
                    let _ = reply.send(match verdict {
                        Verdict::Failed(m) => Err(StoreError::Storage(m)),
                        _ => Ok(()),
                    });
                }
            }
        }
    }
}

/// What became of one piece of work in a batch.
enum Verdict {
    /// Committed (once the batch's transaction is).
    Done,
    /// A submission over quota: nothing recorded.
    Refused(ApiError),
    /// The change failed.
    Failed(String),
}

/// Runs one piece of work inside the batch's transaction. A storage failure is
/// an `Err` (the batch is retried piece by piece); a change's own failure too.
fn apply(t: &mut Txn<'_>, w: &mut Work) -> Result<Verdict, StoreError> {
    match w {
        Work::Apply { change, .. } => change(t).map(|()| Verdict::Done),
        Work::Submit(s) => {
            let job = &s.job;
            if let Some(q) = &s.quota {
                // Read once: the checked sum is both the quota test and what is stored.
                let over = match t.usage(&job.owner)?.plus(job.reserved) {
                    None => "more than can be counted".to_string(),
                    Some(w) => match w.exceeds(q) {
                        None => {
                            t.set_usage(&job.owner, w)?;
                            String::new()
                        }
                        Some(over) => over,
                    },
                };
                if !over.is_empty() {
                    return Ok(Verdict::Refused(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "denied",
                        format!(
                            "quota of user '{}' exceeded: this {} would hold {over}",
                            job.owner,
                            job.kind.as_str()
                        ),
                    )));
                }
            }
            t.put_job(job, Some("queued"))?;
            if s.started {
                let mut running = job.clone();
                running.state = JobState::Running;
                t.put_job(&running, Some("running"))?;
            }
            if let Some(a) = &s.audit {
                t.audit(a.clone())?;
            }
            Ok(Verdict::Done)
        }
    }
}

/// Runs queued jobs as the scheduler hands them out. The running jobs belong
/// to this task: aborting it (a stop) cancels them at their next wait, as a
/// crash would between two transactions; a restarted site resumes them.
pub fn spawn_runner(core: Arc<SiteCore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.try_join_next().is_some() {}
            while let Some(run) = core.scheduler.next() {
                let core = core.clone();
                running.spawn(async move {
                    core.run_job(&run.id, run.recorded_running).await;
                    drop(run);
                });
            }
            tokio::select! {
                _ = core.scheduler.changed() => {}
                // Reaps ended jobs while nothing new comes.
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
    })
}

impl SiteCore {
    /// Updates a job in one durable transaction (its record, and usage via `f`).
    pub fn update_job(
        &self,
        id: &str,
        message: Option<&str>,
        f: impl FnOnce(&mut Job, &mut Txn<'_>) -> Result<(), StoreError>,
    ) -> Result<Job, StoreError> {
        self.store.write(|t| {
            let mut job = t
                .job(id)?
                .ok_or_else(|| StoreError::Storage(format!("job {id} vanished")))?;
            f(&mut job, t)?;
            job.updated_ms = now_ms();
            t.put_job(&job, message)?;
            Ok(job)
        })
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

    /// Runs (or resumes) one job to its end; `recorded_running` when its
    /// submission recorded it `running` already.
    pub async fn run_job(self: &Arc<Self>, id: &str, recorded_running: bool) {
        let started = match recorded_running {
            true => self.store.job(id),
            // Queued → running in one transaction, so a cancel cannot slip in
            // between. Lazily durable, in the writer's next batch: a crash that
            // undoes it leaves the job queued, and resumed.
            false => {
                let key = id.to_string();
                self.submitter
                    .run(true, move |t| {
                        let Some(mut j) = t.job(&key)? else {
                            return Ok(None);
                        };
                        if j.state == JobState::Queued {
                            j.state = JobState::Running;
                            j.updated_ms = now_ms();
                            t.put_job(&j, Some("running"))?;
                        }
                        Ok(Some(j))
                    })
                    .await
            }
        };
        let job = match started {
            Ok(Some(j)) if !j.state.is_terminal() => j,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(job = id, "cannot start job: {e}");
                return;
            }
        };
        let outcome = match self.budget(&job) {
            None => self.dispatch(&job).await,
            Some(budget) => tokio::time::timeout(budget, self.dispatch(&job))
                .await
                .unwrap_or_else(|_| {
                    Err(OpError {
                        kind: "timeout".into(),
                        message: format!(
                            "the {} did not end within its budget of {} s (site policy)",
                            job.kind.as_str(),
                            budget.as_secs()
                        ),
                    })
                }),
        };
        // A copy-in's bytes leave the user's staging quota before its end is
        // visible, so a client that saw it end may stage the next at once. The
        // file lives until that end is on disk: a crash before then runs the
        // copy again from it (a restart recounts the files it finds).
        if job.kind == JobKind::CopyIn {
            self.staging.give_back(&self.staged_in(id));
        }
        if let Err(e) = self.finish(id, outcome).await {
            tracing::error!(job = id, "cannot record the end of a job: {e}");
            return;
        }
        if job.kind == JobKind::CopyIn {
            self.staging.remove(&self.staged_in(id)).await;
        }
    }

    /// How long a job touching only a guest may run before the site gives up on
    /// it and frees its slot: a command's own budget plus time to reach the agent
    /// and wait for the guest agent; a copy's by site policy. (A provision's steps
    /// are each bounded by the agent.) Jobs that change what
    /// exists (VMs, disks) are never abandoned half-way.
    fn budget(&self, job: &Job) -> Option<std::time::Duration> {
        let secs = match job.kind {
            JobKind::Exec => {
                let ms = job.params["timeout-ms"].as_u64().unwrap_or(60_000);
                ms.div_ceil(1000) + EXEC_GRACE_S
            }
            JobKind::CopyIn | JobKind::CopyOut => self.config.max_copy_seconds,
            _ => return None,
        };
        Some(std::time::Duration::from_secs(secs))
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

    /// Records a job's end, durably (group-committed) before anyone can see it: a
    /// finished job never changes state again. A job that fails gives back what it
    /// reserved (a request that failed after getting a VM destroyed it before this).
    async fn finish(&self, id: &str, outcome: Result<Value, OpError>) -> Result<(), StoreError> {
        let id = id.to_string();
        let ended = self
            .submitter
            .run(false, move |t| {
                let Some(mut job) = t.job(&id)? else {
                    return Err(StoreError::Storage(format!("job {id} vanished")));
                };
                if job.state.is_terminal() {
                    return Ok(None);
                }
                // A finished job needs its secrets no more.
                scrub(&mut job.params);
                if job.reserved != Usage::default() {
                    t.move_usage(&job.owner, job.reserved, Usage::default())?;
                    job.reserved = Usage::default();
                }
                let message = match &outcome {
                    Ok(v) => {
                        job.state = JobState::Succeeded;
                        job.result = Some(v.clone());
                        "succeeded".to_string()
                    }
                    Err(e) => {
                        job.state = JobState::Failed;
                        job.error = Some(e.clone());
                        format!("failed: {} ({})", e.message, e.kind)
                    }
                };
                job.updated_ms = now_ms();
                t.put_job(&job, Some(&message))?;
                Ok(Some(job))
            })
            .await?;
        if let Some(job) = ended {
            self.job_ended(&job);
        }
        Ok(())
    }

    /// Counts a job that ended (`gve_site_jobs_*` metrics).
    fn job_ended(&self, job: &Job) {
        self.metrics.work.ended(
            job.kind.as_str(),
            &crate::metrics::name_of(&job.state),
            std::time::Duration::from_millis(job.updated_ms.saturating_sub(job.created_ms)),
        );
    }

    /// Records that `caller` did `action` on `target` (durably, group-committed).
    pub async fn audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        detail: Value,
    ) -> Result<(), ApiError> {
        let entry = audit_entry(who, action, target, detail);
        self.submitter
            .apply(move |t| t.audit(entry.clone()))
            .await
            .map_err(db)
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
            t.move_usage(&job.owner, job.reserved, Usage::default())?;
            job.reserved = Usage::default();
            job.state = JobState::Cancelled;
            job.updated_ms = now_ms();
            t.put_job(&job, Some("cancelled"))?;
            Ok(Ok(job))
        });
        let job = r.map_err(db)??;
        self.job_ended(&job);
        self.scheduler.forget(&job.owner, &job.id);
        // Its staged input will never be sent.
        if job.kind == JobKind::CopyIn {
            let staged = self.staged_in(id);
            let _ = std::fs::remove_file(&staged);
            self.staging.give_back(&staged);
        }
        Ok(job)
    }

    /// Queues every job a previous run left queued or running: those that were
    /// running (recovery) and lease expiries in the system lane, the others in
    /// their owners' queues.
    pub fn resume_all(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        self.store.for_each_active(|j| {
            let lane = if j.state == JobState::Running || j.kind == JobKind::Expire {
                Lane::System
            } else {
                Lane::User
            };
            self.scheduler.push(&j.owner, j.id, lane);
            n += 1;
        })?;
        Ok(n)
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
        kind: match e {
            StoreError::NoAgent { .. } => "not-found",
            _ => "backend",
        }
        .into(),
        message: e.to_string(),
    }
}

/// An audit entry (its sequence number and time are set when it is stored).
pub fn audit_entry(who: &str, action: &str, target: &str, detail: Value) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at_ms: 0,
        who: who.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        detail,
    }
}

/// What an audit log may say of a job's parameters: an exec's argv, cwd and the
/// names (never the values) of its environment; never its stdin.
pub fn audit_detail(params: &Value) -> Value {
    let mut d = serde_json::Map::new();
    if let Some(o) = params.as_object() {
        for (k, v) in o {
            match k.as_str() {
                "env" => {
                    let names: Vec<&String> = v
                        .as_object()
                        .map(|m| m.keys().collect())
                        .unwrap_or_default();
                    d.insert("env-names".into(), serde_json::json!(names));
                }
                "stdin-b64" => {}
                _ => {
                    d.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Value::Object(d)
}
