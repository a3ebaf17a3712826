//! Work on a tree shared out to a thread per core: directories to list, say, where listing
//! one finds more. Each thread takes a job, does it, and adds the jobs it found; all stop
//! when none are left and none are being done, or at the first failure.

use std::sync::{Condvar, Mutex};

/// At most this many threads, the caller's included.
pub const MAX_THREADS: usize = 4;

/// Jobs not yet taken, how many are being done, whether one failed.
struct Work<J> {
    todo: Vec<J>,
    busy: usize,
    failed: bool,
}

struct Shared<J> {
    work: Mutex<Work<J>>,
    ready: Condvar,
}

/// Does `jobs`, and every job they add, on up to [`MAX_THREADS`] threads (one per core;
/// the caller's is one). Each thread keeps a state made by `state`, handed to `job` with
/// each job and a list to add new ones to. Jobs added last are taken first (depth first,
/// for a tree). Returns every thread's state, or the first error: the other threads stop
/// taking jobs then. A panic in a job is passed on to the caller.
pub fn share_out<J, S, E>(
    jobs: Vec<J>,
    state: impl Fn() -> S + Sync,
    job: impl Fn(&mut S, J, &mut Vec<J>) -> Result<(), E> + Sync,
) -> Result<Vec<S>, E>
where
    J: Send,
    S: Send,
    E: Send,
{
    let shared = Shared { work: Mutex::new(Work { todo: jobs, busy: 0, failed: false }), ready: Condvar::new() };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_THREADS);
    let run = || work(&shared, state(), &job);
    let results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(run)).collect();
        let mut results = vec![run()];
        for h in helpers {
            results.push(h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        results
    });
    results.into_iter().collect()
}

fn work<J, S, E>(
    shared: &Shared<J>,
    mut state: S,
    job: &impl Fn(&mut S, J, &mut Vec<J>) -> Result<(), E>,
) -> Result<S, E> {
    let lock = || shared.work.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut found = Vec::new();
    loop {
        let next = {
            let mut w = lock();
            loop {
                if w.failed {
                    return Ok(state);
                }
                if let Some(j) = w.todo.pop() {
                    w.busy += 1;
                    break j;
                }
                if w.busy == 0 {
                    shared.ready.notify_all();
                    return Ok(state);
                }
                w = shared.ready.wait(w).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        // A panic here fails the others' waits: they stop too.
        let failed = Failed(shared);
        let done = job(&mut state, next, &mut found);
        std::mem::forget(failed);
        let mut w = lock();
        w.busy -= 1;
        if let Err(e) = done {
            w.failed = true;
            shared.ready.notify_all();
            return Err(e);
        }
        if !found.is_empty() {
            w.todo.append(&mut found);
            shared.ready.notify_all();
        } else if w.busy == 0 && w.todo.is_empty() {
            shared.ready.notify_all();
        }
    }
}

/// Marks the work failed when dropped: on a panic in a job, so that no thread waits for
/// the jobs it would have added.
struct Failed<'s, J>(&'s Shared<J>);

impl<J> Drop for Failed<'_, J> {
    fn drop(&mut self) {
        let mut w = self.0.work.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        w.failed = true;
        self.0.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree of jobs: job n adds 2n+1 and 2n+2 below `max`.
    fn children(n: u32, max: u32, found: &mut Vec<u32>) {
        found.extend([2 * n + 1, 2 * n + 2].into_iter().filter(|&c| c < max));
    }

    #[test]
    fn every_job_and_every_job_it_adds_is_done_once() {
        for _ in 0..20 {
            let states = share_out(vec![0u32], Vec::new, |seen: &mut Vec<u32>, n, found| -> Result<(), ()> {
                seen.push(n);
                children(n, 5000, found);
                Ok(())
            })
            .unwrap();
            let mut all: Vec<u32> = states.into_iter().flatten().collect();
            all.sort_unstable();
            assert_eq!(all, (0..5000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_first_failure_stops_the_work() {
        let e = share_out(
            vec![0u32],
            || (),
            |_, n, found| {
                if n == 777 {
                    return Err(format!("job {n}"));
                }
                children(n, 100_000, found);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(e, "job 777");
        let none: Result<Vec<()>, ()> = share_out(Vec::<u32>::new(), || (), |_, _, _| Ok(()));
        assert!(none.is_ok());
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            share_out(
                vec![0u32],
                || (),
                |_, n, found| -> Result<(), ()> {
                    assert!(n != 300, "job 300");
                    children(n, 10_000, found);
                    Ok(())
                },
            )
        });
        assert!(r.is_err());
    }
}
