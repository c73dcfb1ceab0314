//! What the frame that sends many requests costs the main thread, counted in heap
//! allocations (a count does not vary with the host's load, unlike a time).
//!
//! The plugin reads a frame's requests in `Last`: the main thread clones each message and
//! hands the lot to the scheduler; making a job per request, its scope and its place in the
//! order happens on the task pool once a frame sent more than a few. One allocation per save
//! is the key's clone; everything else is per frame.
#![cfg(feature = "bevy")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_storage::backend::MemoryBackend;
use bevy_storage::prelude::*;

/// The system allocator, counting the allocations of threads that asked for it.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to `System` unchanged; counting touches no heap memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Resource, Default)]
struct Answered(usize, usize);

/// Runs frames until `n` saves were answered (the second count: how many failed).
fn pump(app: &mut App, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while app.world().resource::<Answered>().0 < n {
        assert!(Instant::now() < deadline, "the saves were not all answered");
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(app.world().resource::<Answered>().1, 0, "a save failed");
}

#[test]
fn the_frame_that_sends_ten_thousand_saves_allocates_about_once_per_save() {
    const N: usize = 10_000;
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, StoragePlugin::custom(MemoryBackend::new())))
        .init_resource::<Answered>()
        .add_systems(
            Update,
            |mut done: MessageReader<SaveCompleted>, mut n: ResMut<Answered>| {
                for done in done.read() {
                    n.0 += 1;
                    n.1 += usize::from(done.result.is_err());
                }
            },
        );
    let value = "v".repeat(200);
    let mut per_request = Vec::new();
    for round in 0..3 {
        app.world_mut().resource_mut::<Answered>().0 = 0;
        for i in 0..N {
            app.world_mut()
                .write_message(SaveRequest::new(format!("d{i}"), value.clone()));
        }
        ALLOCATIONS.store(0, Ordering::Relaxed);
        COUNTING.with(|c| c.set(true));
        app.update(); // reads and dispatches them (`Last`)
        COUNTING.with(|c| c.set(false));
        let allocations = ALLOCATIONS.load(Ordering::Relaxed);
        per_request.push(allocations as f64 / N as f64);
        println!("round {round}: {allocations} allocations on the main thread for {N} saves");
        pump(&mut app, N);
    }
    // The first round also opens the store and grows the message buffers.
    let steady = per_request[1..].iter().copied().fold(f64::MAX, f64::min);
    assert!(
        steady < 1.5,
        "the dispatching frame made {steady:.2} allocations per save on the main thread (rounds: {per_request:?})"
    );
}
