//! Fair job scheduling: which recorded job runs next.
//!
//! Every user has their own queue. Runs are handed out round-robin between users
//! with queued work, each user holding at most `max-running-per-user` of the
//! `parallel-jobs` run slots, so one tenant's thousand long commands never keep
//! another tenant's request waiting for more than one slot to free. A user may
//! have at most `max-queued-per-user` jobs waiting; a submission beyond that is
//! refused `429` with a `Retry-After` estimated from how long jobs take.
//!
//! System jobs (a lease's expiry, and jobs a restarted site resumes mid-run) have
//! their own lane with its own slots: they never wait behind users' work.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::sync::Notify;

use crate::api::ApiError;

/// The limits a scheduler enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// User jobs run at once, site-wide.
    pub parallel: usize,
    /// User jobs of one user run at once.
    pub running_per_user: usize,
    /// Jobs of one user waiting to run.
    pub queued_per_user: usize,
    /// System jobs run at once (beside the user slots).
    pub system: usize,
}

/// Which lane a job runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A user's job: fair-shared.
    User,
    /// Lease expiry and recovery: never behind users' work.
    System,
}

/// Hands out run slots fairly; see the module documentation.
pub struct Scheduler {
    limits: Limits,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    users: HashMap<String, UserQueue>,
    /// Users with queued work and a free slot of their own, in turn order.
    turn: VecDeque<String>,
    running: usize,
    system: VecDeque<String>,
    system_running: usize,
    /// Jobs given their slot as they were recorded ([`Ticket::start_now`]),
    /// with their owners, for [`Scheduler::next`] to hand out first.
    started: VecDeque<(String, String)>,
    /// Moving average of how long a user job runs, milliseconds.
    mean_run_ms: f64,
}

#[derive(Default)]
struct UserQueue {
    queue: VecDeque<String>,
    /// Admitted but not yet handed to the queue (being recorded).
    admitting: usize,
    running: usize,
    in_turn: bool,
}

impl UserQueue {
    fn waiting(&self) -> usize {
        self.queue.len() + self.admitting
    }
}

/// A place in a user's queue, held while the job is recorded; given back if the
/// job is not (dropped without [`Scheduler::enqueue`]).
pub struct Ticket {
    owner: String,
    sched: Option<Arc<Scheduler>>,
    /// Holds a run slot already ([`Ticket::start_now`]).
    started: bool,
}

/// A job the scheduler has started: its slot is given back when this is dropped.
pub struct Run {
    /// The job.
    pub id: String,
    /// Recorded `running` with its submission ([`Ticket::start_now`]): the
    /// runner need not write it.
    pub recorded_running: bool,
    owner: Option<String>,
    started: Instant,
    sched: Arc<Scheduler>,
}

impl Scheduler {
    /// A scheduler with `limits` (each at least 1).
    pub fn new(limits: Limits) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            limits: Limits {
                parallel: limits.parallel.max(1),
                running_per_user: limits.running_per_user.max(1),
                queued_per_user: limits.queued_per_user.max(1),
                system: limits.system.max(1),
            },
            state: Mutex::new(State {
                mean_run_ms: 1000.0,
                ..Default::default()
            }),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place in `owner`'s queue for a job about to be recorded, or says
    /// (`429`, with when to retry) that their queue is full.
    pub fn admit(self: &Arc<Self>, owner: &str) -> Result<Ticket, ApiError> {
        let mut s = self.lock();
        let mean_ms = s.mean_run_ms;
        let q = s.users.entry(owner.to_string()).or_default();
        if q.waiting() >= self.limits.queued_per_user {
            // About when one of this user's queued jobs will have started.
            let per_slot = self.limits.running_per_user.min(self.limits.parallel) as f64;
            let retry_s = (mean_ms / per_slot / 1000.0).ceil().clamp(1.0, 300.0) as u64;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-jobs",
                format!(
                    "user '{owner}' has {} jobs waiting, the most this site queues per user; \
                     retry when some have run",
                    q.waiting()
                ),
            )
            .retry_after(retry_s));
        }
        q.admitting += 1;
        Ok(Ticket {
            owner: owner.to_string(),
            sched: Some(self.clone()),
            started: false,
        })
    }

    /// Queues a recorded job on the place `ticket` holds; one whose ticket took
    /// its slot already ([`Ticket::start_now`]) is handed out next.
    pub fn enqueue(&self, mut ticket: Ticket, id: String) {
        ticket.sched = None;
        let mut s = self.lock();
        if ticket.started {
            s.started.push_back((id, std::mem::take(&mut ticket.owner)));
            drop(s);
            self.wake.notify_one();
            return;
        }
        let q = s.users.entry(ticket.owner.clone()).or_default();
        q.admitting = q.admitting.saturating_sub(1);
        q.queue.push_back(id);
        self.ready(&mut s, &ticket.owner);
        drop(s);
        self.wake.notify_one();
    }

    /// Queues a job without asking (resumed at start); `lane` says where.
    pub fn push(&self, owner: &str, id: String, lane: Lane) {
        let mut s = self.lock();
        match lane {
            Lane::System => s.system.push_back(id),
            Lane::User => {
                s.users
                    .entry(owner.to_string())
                    .or_default()
                    .queue
                    .push_back(id);
                self.ready(&mut s, owner);
            }
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Drops a queued job (cancelled) so that it no longer holds a place.
    pub fn forget(&self, owner: &str, id: &str) {
        let mut s = self.lock();
        if let Some(q) = s.users.get_mut(owner) {
            q.queue.retain(|j| j != id);
            if q.queue.is_empty() && q.running == 0 && q.admitting == 0 {
                s.users.remove(owner);
            }
        }
    }

    /// How many jobs of `owner` wait and run.
    pub fn counts(&self, owner: &str) -> (usize, usize) {
        let s = self.lock();
        s.users
            .get(owner)
            .map_or((0, 0), |q| (q.waiting(), q.running))
    }

    /// Puts `owner` in turn if they have work and a free slot of their own.
    fn ready(&self, s: &mut State, owner: &str) {
        let Some(q) = s.users.get_mut(owner) else {
            return;
        };
        if !q.in_turn && !q.queue.is_empty() && q.running < self.limits.running_per_user {
            q.in_turn = true;
            s.turn.push_back(owner.to_string());
        }
    }

    /// The next job to run, if a slot is free for one.
    pub fn next(self: &Arc<Self>) -> Option<Run> {
        let mut s = self.lock();
        if s.system_running < self.limits.system {
            if let Some(id) = s.system.pop_front() {
                s.system_running += 1;
                return Some(self.run(id, None));
            }
        }
        // Their slots are taken already.
        if let Some((id, owner)) = s.started.pop_front() {
            let mut run = self.run(id, Some(owner));
            run.recorded_running = true;
            return Some(run);
        }
        while s.running < self.limits.parallel {
            let owner = s.turn.pop_front()?;
            let limit = self.limits.running_per_user;
            let Some(q) = s.users.get_mut(&owner) else {
                continue;
            };
            q.in_turn = false;
            let Some(id) = q.queue.pop_front() else {
                continue;
            };
            q.running += 1;
            if !q.queue.is_empty() && q.running < limit {
                q.in_turn = true;
                s.turn.push_back(owner.clone());
            }
            s.running += 1;
            return Some(self.run(id, Some(owner)));
        }
        None
    }

    fn run(self: &Arc<Self>, id: String, owner: Option<String>) -> Run {
        Run {
            id,
            recorded_running: false,
            owner,
            started: Instant::now(),
            sched: self.clone(),
        }
    }

    /// Waits until a slot may have freed or work arrived.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Gives a slot back; `took` is how long its job ran, if it ran.
    fn done(&self, owner: Option<&str>, took: Option<Duration>) {
        let mut s = self.lock();
        match owner {
            None => s.system_running = s.system_running.saturating_sub(1),
            Some(owner) => {
                s.running = s.running.saturating_sub(1);
                if let Some(took) = took {
                    let ms = took.as_secs_f64() * 1000.0;
                    s.mean_run_ms = 0.9 * s.mean_run_ms + 0.1 * ms;
                }
                if let Some(q) = s.users.get_mut(owner) {
                    q.running = q.running.saturating_sub(1);
                    if q.queue.is_empty() && q.running == 0 && q.admitting == 0 {
                        s.users.remove(owner);
                    } else {
                        self.ready(&mut s, owner);
                    }
                }
            }
        }
        drop(s);
        self.wake.notify_one();
    }
}

impl Ticket {
    /// Takes a run slot for this job at once, as it is recorded, when that is
    /// what [`Scheduler::next`] would do anyway: a slot is free, no user waits
    /// for one, and the owner has nothing queued and a slot of their own. The
    /// job is then recorded `running` with its submission and handed out first
    /// (no second write before it runs). True if the ticket holds a slot.
    pub fn start_now(&mut self) -> bool {
        if self.started {
            return true;
        }
        let Some(sched) = &self.sched else {
            return false;
        };
        let limits = sched.limits;
        let mut s = sched.lock();
        if s.running >= limits.parallel || !s.turn.is_empty() {
            return false;
        }
        let Some(q) = s.users.get_mut(&self.owner) else {
            return false;
        };
        if !q.queue.is_empty() || q.running >= limits.running_per_user {
            return false;
        }
        q.admitting = q.admitting.saturating_sub(1);
        q.running += 1;
        s.running += 1;
        self.started = true;
        true
    }

    /// Holds a run slot already ([`Ticket::start_now`]).
    pub fn started(&self) -> bool {
        self.started
    }
}

/// Starts at once ([`Ticket::start_now`]) what a batch of submissions, in its
/// order, can: at most one job per owner, as the turns between users would
/// give; the others wait in their owners' queues.
pub fn start_batch<'a>(tickets: impl IntoIterator<Item = &'a mut Ticket>) {
    let mut owners = std::collections::HashSet::new();
    for t in tickets {
        if !owners.contains(&t.owner) && t.start_now() {
            owners.insert(t.owner.clone());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(sched) = self.sched.take() {
            if self.started {
                // Its job was not recorded: the slot it took is free again.
                sched.done(Some(&self.owner), None);
                return;
            }
            let mut s = sched.lock();
            if let Some(q) = s.users.get_mut(&self.owner) {
                q.admitting = q.admitting.saturating_sub(1);
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.sched
            .done(self.owner.as_deref(), Some(self.started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(parallel: usize, per_user: usize, queued: usize) -> Limits {
        Limits {
            parallel,
            running_per_user: per_user,
            queued_per_user: queued,
            system: 1,
        }
    }

    fn submit(s: &Arc<Scheduler>, owner: &str, id: &str) {
        let t = s.admit(owner).unwrap();
        s.enqueue(t, id.to_string());
    }

    #[test]
    fn users_take_turns_and_none_holds_more_than_their_share() {
        let s = Scheduler::new(limits(3, 2, 100));
        for i in 0..10 {
            submit(&s, "flood", &format!("f{i}"));
        }
        submit(&s, "b", "b0");
        submit(&s, "b", "b1");
        submit(&s, "c", "c0");
        let runs: Vec<Run> = std::iter::from_fn(|| s.next()).collect();
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        // Round robin: flood, b, c, then no slot is left.
        assert_eq!(ids, ["f0", "b0", "c0"]);
        drop(runs);
        let runs: Vec<Run> = std::iter::from_fn(|| s.next()).collect();
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.contains(&"b1"), "{ids:?}");
        // The flooder holds at most 2 slots.
        assert!(ids.iter().filter(|i| i.starts_with('f')).count() <= 2);
    }

    #[test]
    fn a_full_queue_is_refused_with_a_retry_after_and_frees_as_jobs_start() {
        let s = Scheduler::new(limits(1, 1, 3));
        for i in 0..3 {
            submit(&s, "a", &format!("a{i}"));
        }
        let e = s.admit("a").err().expect("a fourth is refused");
        assert_eq!(e.status, 429);
        assert!(e.retry_after_s.is_some_and(|s| s >= 1), "{e:?}");
        // Another user is not affected.
        submit(&s, "b", "b0");
        // A ticket given back (the job was not recorded) frees its place.
        let run = s.next().unwrap();
        assert_eq!(run.id, "a0");
        let t = s.admit("a").unwrap();
        drop(t);
        assert_eq!(s.counts("a"), (2, 1));
        // Cancelling frees a place too.
        s.forget("a", "a2");
        assert_eq!(s.counts("a"), (1, 1));
    }

    #[test]
    fn system_jobs_run_while_every_user_slot_is_taken() {
        let s = Scheduler::new(limits(1, 1, 10));
        submit(&s, "a", "a0");
        submit(&s, "a", "a1");
        let busy = s.next().unwrap();
        assert!(s.next().is_none(), "the one user slot is taken");
        s.push("a", "expire".into(), Lane::System);
        let sys = s.next().expect("the system lane has its own slot");
        assert_eq!(sys.id, "expire");
        drop((busy, sys));
        assert_eq!(s.next().unwrap().id, "a1");
    }

    #[test]
    fn a_job_starts_as_it_is_recorded_only_where_no_other_waits() {
        let s = Scheduler::new(limits(2, 1, 10));
        let mut t = s.admit("a").unwrap();
        assert!(t.start_now());
        s.enqueue(t, "a0".into());
        let a0 = s.next().unwrap();
        assert_eq!((a0.id.as_str(), a0.recorded_running), ("a0", true));
        // The owner's own slot is taken: queued, not started.
        let mut t = s.admit("a").unwrap();
        assert!(!t.start_now());
        s.enqueue(t, "a1".into());
        // Another user takes the second slot at once.
        let mut t = s.admit("b").unwrap();
        assert!(t.start_now());
        // No slot is left; a ticket given back without its job frees its slot.
        let mut c = s.admit("c").unwrap();
        assert!(!c.start_now());
        drop(t);
        assert_eq!(s.counts("b"), (0, 0));
        assert!(c.start_now(), "b's slot is free again");
        drop(c);
        // A user waiting in turn for a free slot goes first.
        drop(a0);
        let mut d = s.admit("d").unwrap();
        assert!(!d.start_now(), "a1 waits for the slot a0 freed");
        s.enqueue(d, "d0".into());
        let runs: Vec<Run> = std::iter::from_fn(|| s.next()).collect();
        let next: Vec<(&str, bool)> = runs
            .iter()
            .map(|r| (r.id.as_str(), r.recorded_running))
            .collect();
        assert_eq!(next, [("a1", false), ("d0", false)]);
    }

    #[test]
    fn a_batch_starts_at_most_one_job_per_owner() {
        let s = Scheduler::new(limits(10, 3, 10));
        let mut batch: Vec<Ticket> = ["a", "a", "b", "a", "b", "c"]
            .iter()
            .map(|o| s.admit(o).unwrap())
            .collect();
        start_batch(batch.iter_mut());
        let started: Vec<bool> = batch.iter().map(Ticket::started).collect();
        assert_eq!(started, [true, false, true, false, false, true]);
        assert_eq!(s.lock().running, 3);
    }

    #[test]
    fn an_idle_user_leaves_nothing_behind() {
        let s = Scheduler::new(limits(2, 2, 2));
        submit(&s, "a", "a0");
        drop(s.next().unwrap());
        assert!(s.lock().users.is_empty());
        assert!(s.lock().turn.is_empty());
    }
}
