//! The components that shutdown stops, registered at build time in ordered stages.
//!
//! A component (the run tasks, the HTTP server, the gRPC server, the lease loop, the store) registers once, in its
//! [`Stage`], and gets a [`Component`]: the token that tells it to stop and the tracker its tasks run on. The shutdown
//! sequence stops the stages in order, each by cancelling its tokens and waiting for its tasks, so adding a component
//! is one registration and the sequence never changes. What is still running can be named at any moment
//! ([`Stages::pending`]), stage by stage, for the progress lines and the watchdog. A leaf: the components below
//! the shutdown sequence (the run service) take their [`Component`] from here without importing the sequence.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// When a component stops, in order. Open streams are drained before any of these (see `shutdown/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Runs still going end with `run_interrupted` and record their end.
    Runs,
    /// Servers stop accepting and close their connections.
    Servers,
    /// Background work (lease refreshes) stops once nothing depends on it.
    Background,
    /// The store closes last.
    Store,
}

impl Stage {
    pub const ALL: [Self; 4] = [Self::Runs, Self::Servers, Self::Background, Self::Store];
}

/// What a registered component holds: its stop signal, and the tracker to spawn its tasks on.
#[derive(Debug, Clone)]
pub struct Component {
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
    aborts: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Component {
    /// Spawns a task of this component; one that outlives the component's grace is aborted.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_on(task, &tokio::runtime::Handle::current());
    }

    /// Spawns a task of this component on `runtime`, not necessarily the caller's; stopped as [`Component::spawn`]'s.
    pub fn spawn_on<F>(&self, task: F, runtime: &tokio::runtime::Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.tasks.spawn_on(task, runtime);
        self.aborts
            .lock()
            .expect("abort handles lock")
            .push(handle.abort_handle());
    }
}

#[derive(Debug)]
struct Registered {
    stage: Stage,
    name: &'static str,
    component: Component,
    /// How long its tasks may take once told to stop; `None` = until the hard deadline.
    grace: Option<Duration>,
}

/// Every registered component; shared by the shutdown sequence and the watchdog.
#[derive(Debug, Default)]
pub struct Stages {
    registered: Vec<Registered>,
}

impl Stages {
    /// Registers a component; what it spawns on the returned [`Component`] is what its stage waits for.
    pub fn register(
        &mut self,
        stage: Stage,
        name: &'static str,
        grace: Option<Duration>,
    ) -> Component {
        let component = Component {
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            aborts: Arc::default(),
        };
        self.registered.push(Registered {
            stage,
            name,
            component: component.clone(),
            grace,
        });
        component
    }

    /// The components with tasks still running and how many, in stopping order: what a progress line names.
    pub fn pending(&self) -> Vec<(&'static str, usize)> {
        let mut pending: Vec<_> = self
            .registered
            .iter()
            .filter(|r| !r.component.tasks.is_empty())
            .map(|r| (r.stage, r.name, r.component.tasks.len()))
            .collect();
        pending.sort_by_key(|(stage, _, _)| *stage);
        pending
            .into_iter()
            .map(|(_, name, tasks)| (name, tasks))
            .collect()
    }

    /// Tells every component of `stage` to stop and waits for their tasks: each up to its grace (then its tasks are
    /// aborted), and none past `deadline`.
    pub async fn stop(&self, stage: Stage, deadline: Instant) {
        let members: Vec<&Registered> = self
            .registered
            .iter()
            .filter(|r| r.stage == stage)
            .collect();
        for member in &members {
            member.component.stop.cancel();
            member.component.tasks.close();
        }
        for member in members {
            let limit = member
                .grace
                .map_or(deadline, |grace| (Instant::now() + grace).min(deadline));
            let tasks = &member.component.tasks;
            if !self.wait_saying(member.name, tasks, limit).await {
                tracing::warn!(
                    component = member.name,
                    tasks = tasks.len(),
                    grace_s = member.grace.map(|g| g.as_secs_f64()),
                    "still running when its time was up; cut"
                );
                for abort in member
                    .component
                    .aborts
                    .lock()
                    .expect("abort handles lock")
                    .iter()
                {
                    abort.abort();
                }
            }
        }
    }

    /// Waits for `tasks` until `limit`, saying every 5 s which component it waits for and what else is pending;
    /// false when the limit came first.
    async fn wait_saying(&self, name: &'static str, tasks: &TaskTracker, limit: Instant) -> bool {
        let mut progress =
            tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let waiting = tokio::time::timeout_at(limit, tasks.wait());
        tokio::pin!(waiting);
        loop {
            tokio::select! {
                waited = &mut waiting => return waited.is_ok(),
                _ = progress.tick() => tracing::info!(
                    component = name,
                    tasks = tasks.len(),
                    left_s = limit.saturating_duration_since(Instant::now()).as_secs(),
                    pending = ?self.pending(),
                    "stopping: still waiting for this component"
                ),
            }
        }
    }
}

/// How often a wait that may be long (the drain, a stage slow to stop) says what it is waiting for.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stages_stop_in_order_and_a_stuck_component_is_cut_after_its_grace() {
        let mut stages = Stages::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        for (stage, name) in [(Stage::Store, "store"), (Stage::Runs, "runs")] {
            let component = stages.register(stage, name, None);
            let (stop, order) = (component.stop.clone(), Arc::clone(&order));
            component.spawn(async move {
                stop.cancelled().await;
                order.lock().unwrap().push(name);
            });
        }
        let stuck = stages.register(Stage::Servers, "stuck", Some(Duration::from_secs(2)));
        stuck.spawn(std::future::pending());
        assert_eq!(stages.pending(), [("runs", 1), ("stuck", 1), ("store", 1)]);

        let deadline = Instant::now() + Duration::from_secs(60);
        let started = Instant::now();
        for stage in Stage::ALL {
            stages.stop(stage, deadline).await;
        }
        assert_eq!(*order.lock().unwrap(), ["runs", "store"]);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        tokio::task::yield_now().await;
        assert!(stages.pending().is_empty(), "{:?}", stages.pending());
    }
}
