//! What a request kind is, once: [`RequestKind`] says what a request touches, how it runs
//! against the [`Store`] and what it answers; everything else (reading the messages, ordering,
//! batching, running on the pool, delivering the response as a message and an observer
//! event) is generic, here and in the [scheduler](super::scheduler).
//!
//! Adding a kind: define the request and response types and `impl RequestKind` beside them
//! in one file (as `take.rs` does), and register it with [`add_request_kind`] where the plugin
//! builds (one line in `requests/run.rs` for key-value kinds, in `world/mod.rs` for world
//! kinds).

use std::any::TypeId;
use std::panic::{AssertUnwindSafe, catch_unwind};

use bevy::ecs::message::MessageCursor;
use bevy::prelude::*;
use parking_lot::Mutex;

use super::requests::{RequestId, SharedError, StorageResponse};
use super::scope::Scope;
use crate::store::{Committed, StorageOperation, Store};

/// One kind of request the plugin answers.
pub(crate) trait RequestKind: Message + Clone {
    /// The answer: written as a message and triggered as an observer event.
    type Response: Message + Event<Trigger<'static>: Default> + Clone + StorageResponse;
    /// What the request takes from the world on the main thread when its turn comes (a
    /// captured world): `()` for key-value kinds. `Default` is what a request that never
    /// took its input runs with.
    type Input: Default + Send + 'static;
    /// What the pool hands back to the main thread: the response itself for key-value kinds.
    type Output: Send + 'static;
    /// The request reads or writes the live world: it takes its [`Input`](Self::Input) and
    /// [`finish`](Self::finish)es on the main thread, and holds its scope until it finished.
    const TOUCHES_WORLD: bool = false;

    /// The request's id (ordering, and the response's id).
    fn id(&self) -> RequestId;
    /// When the request is read: settles what it needs from the app's configuration (the
    /// autosave rotation of a world request).
    fn resolve(&mut self, _world: &World) {}
    /// What it touches (after [`resolve`](Self::resolve)).
    fn scope(&self) -> Scope;
    /// Main thread, when its turn comes (world kinds): what it takes from the world.
    fn input(&self, world: &mut World) -> Result<Self::Input, SharedError>;
    /// On a pool thread: the work against the store.
    fn run(&self, store: &Store, input: Self::Input) -> Self::Output;
    /// Main thread: the response from the pool's output (world kinds apply a loaded world).
    fn finish(&self, world: &mut World, output: Self::Output) -> Self::Response;
    /// Main thread: [`finish`](Self::finish), or the first step of a finish spread over
    /// frames (a load applied a slice per frame).
    fn finish_over_frames(
        &self,
        world: &mut World,
        output: Self::Output,
    ) -> Finish<Self::Response> {
        Finish::Now(self.finish(world, output))
    }
    /// The response of this request failing with `error`.
    fn fail(&self, error: SharedError) -> Self::Response;
    /// A write that may join a write batch: the operation it adds to the batch's transaction.
    fn batch_operation(&self) -> Option<StorageOperation> {
        None
    }
    /// The output of a write committed in a batch, from what it did there.
    fn batched(&self, _committed: Committed) -> Self::Output {
        unreachable!("only kinds with a batch_operation are batched")
    }
}

/// How a request finishes on the main thread.
pub(crate) enum Finish<T> {
    /// The response, now.
    Now(T),
    /// Later: called once a frame (`PreUpdate`) until it returns the response, while the
    /// request holds its scope (no other world request starts meanwhile).
    Later(Step<T>),
}

/// One step of a finish spread over frames: the response once it is the last.
pub(crate) type Step<T> = Box<dyn FnMut(&mut World) -> Option<T> + Send + Sync>;

/// What delivering a job did.
pub(crate) enum Delivered {
    /// The response went out; true when the request succeeded.
    Done(bool),
    /// Its finish goes on over the next frames.
    Later(Box<dyn Continuing>),
}

/// The rest of a finish spread over frames ([`Finish::Later`]).
pub(crate) trait Continuing: Send + Sync {
    /// Main thread, once a frame: the next step; `Some` (true when the request succeeded)
    /// once the response went out.
    fn step(&mut self, world: &mut World) -> Option<bool>;
}

/// A request of kind `R` finishing over frames.
struct Stepping<R: RequestKind> {
    request: R,
    reply: Option<Reply<R::Response>>,
    step: Step<R::Response>,
}

impl<R: RequestKind> Continuing for Stepping<R> {
    fn step(&mut self, world: &mut World) -> Option<bool> {
        let reply = self.reply.take()?;
        let response = match catch_unwind(AssertUnwindSafe(|| (self.step)(world))) {
            Ok(None) => {
                self.reply = Some(reply);
                return None;
            }
            Ok(Some(response)) => response,
            Err(payload) => self.request.fail(super::scheduler::panic_error(payload)),
        };
        let ok = response.is_ok();
        match reply {
            Reply::Public => publish(world, response),
            Reply::Internal(callback) => callback(world, response),
        }
        Some(ok)
    }
}

/// Writes `response` as a message and triggers it as an observer event.
pub(crate) fn publish<E>(world: &mut World, response: E)
where
    E: Message + Event<Trigger<'static>: Default> + Clone,
{
    world.write_message(response.clone());
    world.trigger(response);
}

/// A callback of the plugin's own requests, run on the main thread with the response.
pub(crate) type InternalReply<T> = Box<dyn FnOnce(&mut World, T) + Send + Sync>;

/// Where a request's response goes.
pub(crate) enum Reply<T> {
    /// To the game: a message plus an observer event.
    Public,
    /// To the plugin itself (persisted resources).
    Internal(InternalReply<T>),
}

/// A request on its way through the scheduler, of any kind.
pub(crate) trait Job: Send {
    fn id(&self) -> RequestId;
    fn scope(&self) -> &Scope;
    fn touches_world(&self) -> bool;
    fn batch_operation(&self) -> Option<StorageOperation>;
    /// Main thread, when the job's turn comes (world kinds).
    fn take_input(&mut self, world: &mut World);
    /// Pool thread: runs the request, keeping its output.
    fn execute(&mut self, store: &Store);
    /// Pool thread: records the outcome of the batch the write was committed in.
    fn set_batched(&mut self, outcome: Result<Committed, SharedError>);
    /// Records a failure (the store could not open, the task panicked).
    fn set_failed(&mut self, error: SharedError);
    /// Main thread: writes the response (or hands it to the plugin's callback), or starts a
    /// finish spread over frames.
    fn deliver(self: Box<Self>, world: &mut World) -> Delivered;
}

/// The [`Job`] of a request of kind `R`.
pub(crate) struct Pending<R: RequestKind> {
    request: R,
    scope: Scope,
    reply: Reply<R::Response>,
    input: Option<R::Input>,
    result: Option<Result<R::Output, SharedError>>,
}

impl<R: RequestKind> Pending<R> {
    /// A request of the plugin's own; `reply` gets the response instead of the game.
    pub(crate) fn internal(
        request: R,
        reply: impl FnOnce(&mut World, R::Response) + Send + Sync + 'static,
    ) -> Self {
        Self::new(request, Reply::Internal(Box::new(reply)))
    }

    fn new(request: R, reply: Reply<R::Response>) -> Self {
        let scope = request.scope();
        let scope = if R::TOUCHES_WORLD {
            scope.and_world()
        } else {
            scope
        };
        Self {
            request,
            scope,
            reply,
            input: None,
            result: None,
        }
    }
}

impl<R: RequestKind> Job for Pending<R> {
    fn id(&self) -> RequestId {
        self.request.id()
    }

    fn scope(&self) -> &Scope {
        &self.scope
    }

    fn touches_world(&self) -> bool {
        R::TOUCHES_WORLD
    }

    fn batch_operation(&self) -> Option<StorageOperation> {
        self.request.batch_operation()
    }

    fn take_input(&mut self, world: &mut World) {
        match catch_unwind(AssertUnwindSafe(|| self.request.input(world))) {
            Ok(Ok(input)) => self.input = Some(input),
            Ok(Err(e)) => self.result = Some(Err(e)),
            Err(payload) => self.result = Some(Err(super::scheduler::panic_error(payload))),
        }
    }

    fn execute(&mut self, store: &Store) {
        if self.result.is_some() {
            return; // failed while taking its input
        }
        let input = self.input.take().unwrap_or_default();
        self.result = Some(Ok(self.request.run(store, input)));
    }

    fn set_batched(&mut self, outcome: Result<Committed, SharedError>) {
        self.result = Some(outcome.map(|committed| self.request.batched(committed)));
    }

    fn set_failed(&mut self, error: SharedError) {
        self.result = Some(Err(error));
    }

    fn deliver(self: Box<Self>, world: &mut World) -> Delivered {
        let Pending {
            request,
            reply,
            result,
            ..
        } = *self;
        let response = match result {
            Some(Ok(output)) => {
                match catch_unwind(AssertUnwindSafe(|| {
                    request.finish_over_frames(world, output)
                })) {
                    Ok(Finish::Now(response)) => response,
                    Ok(Finish::Later(step)) => {
                        return Delivered::Later(Box::new(Stepping {
                            request,
                            reply: Some(reply),
                            step,
                        }));
                    }
                    Err(payload) => request.fail(super::scheduler::panic_error(payload)),
                }
            }
            Some(Err(e)) => request.fail(e),
            None => request.fail(super::scheduler::panic_error(Box::new(
                "the request finished without a result",
            ))),
        };
        let ok = response.is_ok();
        match reply {
            Reply::Public => publish(world, response),
            Reply::Internal(callback) => callback(world, response),
        }
        Delivered::Done(ok)
    }
}

/// One frame's requests of one kind, as read from its messages: turned into [`Job`]s later,
/// off the main thread when the frame sent many (see the [scheduler](super::scheduler)).
pub(crate) trait KindBatch: Send {
    /// How many requests.
    fn len(&self) -> usize;
    /// How many of them read or write the live world (their turn needs the main thread).
    fn world_len(&self) -> usize;
    /// Appends one job per request, in the order they were read.
    fn into_jobs(self: Box<Self>, jobs: &mut Vec<Box<dyn Job>>);
}

/// The requests of kind `R` a frame sent, cloned from the messages and resolved.
struct Requests<R: RequestKind>(Vec<R>);

impl<R: RequestKind> KindBatch for Requests<R> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn world_len(&self) -> usize {
        if R::TOUCHES_WORLD { self.0.len() } else { 0 }
    }

    fn into_jobs(self: Box<Self>, jobs: &mut Vec<Box<dyn Job>>) {
        jobs.extend(
            self.0
                .into_iter()
                .map(|request| Box::new(Pending::new(request, Reply::Public)) as Box<dyn Job>),
        );
    }
}

/// Jobs made already (the plugin's own requests).
impl KindBatch for Vec<Box<dyn Job>> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn world_len(&self) -> usize {
        self.iter().filter(|job| job.touches_world()).count()
    }

    fn into_jobs(self: Box<Self>, jobs: &mut Vec<Box<dyn Job>>) {
        jobs.extend(*self);
    }
}

/// Every request a frame sent, of every kind: what the main thread hands to the scheduler.
/// Reading costs a clone of each message; the rest (a job per request, its scope, the order
/// by id) is [`into_jobs`](Self::into_jobs), which runs where the scheduler takes it in.
#[derive(Default)]
pub(crate) struct Intake {
    parts: Vec<Box<dyn KindBatch>>,
    len: usize,
    world_len: usize,
}

impl Intake {
    /// Adds one kind's requests.
    pub(crate) fn push(&mut self, part: Box<dyn KindBatch>) {
        if part.len() == 0 {
            return;
        }
        self.len += part.len();
        self.world_len += part.world_len();
        self.parts.push(part);
    }

    /// How many requests.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many requests read or write the live world.
    pub(crate) fn world_len(&self) -> usize {
        self.world_len
    }

    /// One job per request, in id order (requests of one kind may be sent out of id order,
    /// and kinds interleave).
    pub(crate) fn into_jobs(self) -> Vec<Box<dyn Job>> {
        let mut jobs = Vec::with_capacity(self.len);
        for part in self.parts {
            part.into_jobs(&mut jobs);
        }
        jobs.sort_by_key(|job| job.id());
        jobs
    }
}

/// The reader of one request kind: its place in the kind's messages.
trait KindReader: Send {
    /// Main thread: clones the requests sent since the last call and
    /// [resolves](RequestKind::resolve) them; nothing else per request.
    fn read(&mut self, world: &World) -> Option<Box<dyn KindBatch>>;
}

/// The reader of kind `R`.
struct Reader<R: RequestKind>(MessageCursor<R>);

impl<R: RequestKind> KindReader for Reader<R> {
    fn read(&mut self, world: &World) -> Option<Box<dyn KindBatch>> {
        let messages = world.resource::<Messages<R>>();
        if self.0.is_empty(messages) {
            return None;
        }
        let mut requests: Vec<R> = self.0.read(messages).cloned().collect();
        for request in &mut requests {
            request.resolve(world);
        }
        Some(Box::new(Requests(requests)))
    }
}

/// The request kinds of this app, each read by one generic reader. The readers sit behind a
/// mutex (uncontended: only `dispatch_requests` reads) so that a frame reads every kind with
/// one look-up of this resource, without taking it out of the world.
#[derive(Resource, Default)]
pub(crate) struct RequestKinds {
    kinds: Vec<TypeId>,
    readers: Mutex<Vec<Box<dyn KindReader>>>,
}

impl RequestKinds {
    /// Every request of every kind sent since the last call.
    pub(crate) fn read_all(world: &World) -> Intake {
        let mut intake = Intake::default();
        let Some(kinds) = world.get_resource::<RequestKinds>() else {
            return intake;
        };
        for reader in kinds.readers.lock().iter_mut() {
            if let Some(part) = reader.read(world) {
                intake.push(part);
            }
        }
        intake
    }
}

/// Registers request kind `R`: its messages, its response's messages, its reader.
pub(crate) fn add_request_kind<R: RequestKind>(app: &mut App) {
    let kind = TypeId::of::<R>();
    if app
        .world()
        .get_resource::<RequestKinds>()
        .is_some_and(|kinds| kinds.kinds.contains(&kind))
    {
        return;
    }
    app.add_message::<R>()
        .add_message::<R::Response>()
        .init_resource::<RequestKinds>();
    let mut kinds = app.world_mut().resource_mut::<RequestKinds>();
    kinds.kinds.push(kind);
    kinds
        .readers
        .get_mut()
        .push(Box::new(Reader::<R>(MessageCursor::default())));
}
