//! The plugin's `TakeRequest`: ordered per key with saves and loads, answered once, and a
//! take of the wrong type leaves the record stored.

use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_storage::plugin::{
    LoadCompleted, LoadRequest, RequestId, SaveCompleted, SaveRequest, StoragePlugin,
    StorageResponse, TakeCompleted, TakeRequest,
};

#[derive(Resource, Default)]
struct Seen {
    saves: Vec<SaveCompleted>,
    takes: Vec<TakeCompleted>,
    loads: Vec<LoadCompleted>,
    take_messages: usize,
}

fn count_take_messages(mut seen: ResMut<Seen>, mut takes: MessageReader<TakeCompleted>) {
    seen.take_messages += takes.read().count();
}

fn app() -> App {
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, StoragePlugin::memory()))
        .init_resource::<Seen>()
        .add_systems(Update, count_take_messages)
        .add_observer(|e: On<SaveCompleted>, mut s: ResMut<Seen>| s.saves.push(e.event().clone()))
        .add_observer(|e: On<TakeCompleted>, mut s: ResMut<Seen>| s.takes.push(e.event().clone()))
        .add_observer(|e: On<LoadCompleted>, mut s: ResMut<Seen>| s.loads.push(e.event().clone()));
    app
}

fn pump(app: &mut App, ids: &[RequestId]) {
    let start = Instant::now();
    loop {
        app.update();
        let seen = app.world().resource::<Seen>();
        let answered = |id: &RequestId| {
            seen.saves.iter().any(|r| r.id() == *id)
                || seen.takes.iter().any(|r| r.id() == *id)
                || seen.loads.iter().any(|r| r.id() == *id)
        };
        if ids.iter().all(answered) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no answer to {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn save_take_load_in_one_frame_run_in_order() {
    let mut app = app();
    let save = SaveRequest::new("reward", 250u32);
    let take = TakeRequest::new::<u32>("reward");
    let load = LoadRequest::new("reward");
    let again = TakeRequest::new::<u32>("reward");
    let ids = [save.id(), take.id(), load.id(), again.id()];
    let world = app.world_mut();
    world.write_message(save);
    world.write_message(take);
    world.write_message(load);
    world.write_message(again);
    pump(&mut app, &ids);

    let seen = app.world().resource::<Seen>();
    assert!(seen.saves[0].is_ok());
    let first = seen.takes.iter().find(|t| t.id == ids[1]).unwrap();
    assert_eq!(first.decode::<u32>().unwrap(), Some(250));
    assert!(first.found());
    let load = seen.loads.iter().find(|l| l.id == ids[2]).unwrap();
    assert_eq!(
        load.decode::<u32>().unwrap(),
        None,
        "the take ran before the load"
    );
    let second = seen.takes.iter().find(|t| t.id == ids[3]).unwrap();
    assert_eq!(
        second.decode::<u32>().unwrap(),
        None,
        "only one take gets it"
    );
    assert_eq!(seen.takes.len(), 2);
    app.update();
    assert_eq!(
        app.world().resource::<Seen>().take_messages,
        2,
        "one message per take"
    );
}

#[test]
fn a_take_of_the_wrong_type_fails_and_keeps_the_record() {
    let mut app = app();
    let save = SaveRequest::new("name", "Ada".to_string());
    let wrong = TakeRequest::new::<Vec<u64>>("name");
    let load = LoadRequest::new("name");
    let raw = TakeRequest::bytes("name");
    let ids = [save.id(), wrong.id(), load.id(), raw.id()];
    let world = app.world_mut();
    world.write_message(save);
    world.write_message(wrong);
    world.write_message(load);
    world.write_message(raw);
    pump(&mut app, &ids);

    let seen = app.world().resource::<Seen>();
    let wrong = seen.takes.iter().find(|t| t.id == ids[1]).unwrap();
    let err = wrong.decode::<Vec<u64>>().unwrap_err();
    assert!(
        matches!(*err, bevy_storage::StorageError::Deserialize { .. }),
        "{err}"
    );
    let load = seen.loads.iter().find(|l| l.id == ids[2]).unwrap();
    assert_eq!(load.decode::<String>().unwrap().as_deref(), Some("Ada"));
    let raw = seen.takes.iter().find(|t| t.id == ids[3]).unwrap();
    assert_eq!(raw.decode::<String>().unwrap().as_deref(), Some("Ada"));
}
