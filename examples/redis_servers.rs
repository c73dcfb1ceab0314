//! Two headless game servers share player profiles through one Redis.
//!
//! Each "server" is a thread with a [`Store`] of its own (its own connection pool), both on the
//! same namespace, as two server processes would be. They hand a player over from one to the
//! other with a lease (a create-only save with a TTL), settle a trade in one transaction, and
//! race to record the same matches without ever recording one twice.
//!
//! The records stay in Redis after a run, under the namespace `example:redis_servers`, so you
//! can look at them and run again (the second run finds the profiles the first created):
//!
//! ```sh
//! cargo run --features redis --example redis_servers   # REDIS_URL, default redis://127.0.0.1:6379
//! redis-cli --scan --pattern '{example:redis_servers}:*'   # the braces are part of the keys
//! cargo run --features redis --example redis_servers -- --cleanup   # removes them
//! ```
//! `--namespace NAME` uses another namespace.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use bevy_storage::StorageOperation;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    name: String,
    level: u32,
    gold: u64,
    /// The server the player last played on.
    server: String,
}

struct Server {
    name: &'static str,
    store: Store,
}

impl Server {
    fn open(name: &'static str, url: &str, namespace: &str) -> Result<Self, StorageError> {
        let store = Store::open(StorageConfig::redis(url, namespace).pool_size(4))?;
        Ok(Self { name, store })
    }

    fn say(&self, what: impl AsRef<str>) {
        println!("[{}] {}", self.name, what.as_ref());
    }

    fn profile(&self, player: &str) -> Result<Option<Profile>, StorageError> {
        self.store
            .load(&format!("profile:{player}"), &LoadOptions::default())
    }

    /// A player joins: their profile is created unless another server already did.
    fn join(&self, player: &str) -> Result<Profile, StorageError> {
        let fresh = Profile {
            name: player.into(),
            level: 1,
            gold: 100,
            server: self.name.into(),
        };
        let key = format!("profile:{player}");
        match self
            .store
            .save(&key, &fresh, &SaveOptions::new().overwrite(false))
        {
            Ok(_) => {
                self.say(format!("created the profile of {player}"));
                Ok(fresh)
            }
            Err(StorageError::AlreadyExists { .. }) => {
                let known = self.profile(player)?.expect("the profile exists");
                self.say(format!(
                    "{player} already has a profile (from {}), loaded it",
                    known.server
                ));
                Ok(known)
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the lease that says which server hosts `player`; `false` if another holds it.
    fn host(&self, player: &str) -> Result<bool, StorageError> {
        let lease = SaveOptions::new()
            .overwrite(false)
            .ttl(Duration::from_secs(30))
            .metadata("server", self.name);
        match self
            .store
            .save(&format!("lease:{player}"), &self.name, &lease)
        {
            Ok(_) => Ok(true),
            Err(StorageError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn release(&self, player: &str) -> Result<(), StorageError> {
        self.store.delete(&format!("lease:{player}")).map(drop)
    }
}

fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut namespace = "example:redis_servers".to_owned();
    let mut cleanup = false;
    let mut args = std::env::args().skip(1).peekable();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next_if_not_flag()) {
            ("--cleanup", None) => cleanup = true,
            ("--namespace", Some(name)) => namespace = name,
            _ => {
                eprintln!("usage: redis_servers [--namespace NAME] [--cleanup]");
                std::process::exit(2);
            }
        }
    }
    let result = if cleanup {
        clean(&url, &namespace)
    } else {
        run(&url, &namespace)
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        eprintln!("(start Redis with `redis-server`, or point REDIS_URL at one)");
        std::process::exit(1);
    }
}

/// The next argument, unless it is another flag.
trait NextValue {
    fn next_if_not_flag(&mut self) -> Option<String>;
}

impl<I: Iterator<Item = String>> NextValue for std::iter::Peekable<I> {
    fn next_if_not_flag(&mut self) -> Option<String> {
        self.next_if(|a| !a.starts_with("--"))
    }
}

/// `--cleanup`: removes this namespace's records (and nothing else).
fn clean(url: &str, namespace: &str) -> Result<(), StorageError> {
    let store = Store::open(StorageConfig::redis(url, namespace).pool_size(1))?;
    let count = store.get_stats().item_count;
    store.clear()?;
    println!("removed {count} records of namespace {namespace:?}");
    Ok(())
}

fn run(url: &str, namespace: &str) -> Result<(), StorageError> {
    let eu = Server::open("eu-1", url, namespace)?;
    let us = Server::open("us-1", url, namespace)?;
    let earlier = eu.store.list_keys("")?.len();
    if earlier > 0 {
        println!("namespace {namespace:?} holds {earlier} records of an earlier run");
    }
    println!("two servers share namespace {namespace:?} on one Redis\n");

    // 1. Profiles are shared: whoever sees a player first creates the profile.
    eu.join("ada")?;
    eu.join("bob")?;
    us.join("ada")?;

    // 2. Hand-over: one server at a time hosts a player, through a lease with a TTL.
    assert!(eu.host("ada")?);
    eu.say("hosts ada");
    if !us.host("ada")? {
        let lease = us.store.get_metadata("lease:ada")?.expect("lease");
        us.say(format!(
            "cannot host ada: the lease belongs to {} and expires in {:.1?}",
            lease.custom["server"],
            lease
                .expires_at
                .and_then(|t| t.duration_since(us.store.now()).ok())
                .unwrap_or_default()
        ));
    }
    let mut ada = eu.profile("ada")?.expect("ada");
    ada.level += 4;
    ada.gold += 250;
    ada.server = eu.name.into();
    eu.store
        .save("profile:ada", &ada, &SaveOptions::default())?;
    eu.say(format!(
        "ada reached level {} with {} gold; she logs out",
        ada.level, ada.gold
    ));
    eu.release("ada")?;
    assert!(us.host("ada")?);
    let ada = us.profile("ada")?.expect("ada");
    us.say(format!(
        "hosts ada now, and sees level {} and {} gold",
        ada.level, ada.gold
    ));

    // 3. A trade between players on different servers, all or nothing.
    let mut bob = us.profile("bob")?.expect("bob");
    let mut ada = ada;
    ada.gold -= 200;
    bob.gold += 200;
    us.store.transaction(vec![
        StorageOperation::save("profile:ada", ada),
        StorageOperation::save("profile:bob", bob),
    ])?;
    let (ada, bob) = (
        eu.profile("ada")?.expect("ada"),
        eu.profile("bob")?.expect("bob"),
    );
    eu.say(format!(
        "sees the trade: ada {} gold, bob {} gold",
        ada.gold, bob.gold
    ));

    // 4. Both servers race to record the same 20 matches: each is recorded exactly once.
    let start = Arc::new(Barrier::new(2));
    let racers: Vec<_> = [eu, us]
        .into_iter()
        .map(|server| {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                let mut won = 0;
                for n in 0..20 {
                    let result = format!("match {n} recorded by {}", server.name);
                    match server.store.save(
                        &format!("match:{n:02}"),
                        &result,
                        &SaveOptions::new().overwrite(false),
                    ) {
                        Ok(_) => won += 1,
                        Err(StorageError::AlreadyExists { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                server.say(format!(
                    "recorded {won} of the 20 matches (the rest by the other server or an earlier run)"
                ));
                Ok(server)
            })
        })
        .collect();
    let mut servers = Vec::new();
    for racer in racers {
        servers.push(racer.join().expect("server thread panicked")?);
    }
    let matches = servers[0].store.list_keys("match:")?;
    println!("\n{} matches recorded in all, none twice", matches.len());
    assert_eq!(matches.len(), 20);

    for server in &servers {
        let stats = server.store.get_stats();
        server.say(format!(
            "sees {} records, {} bytes, healthy: {}; {} writes, avg {:?}",
            stats.item_count,
            stats.total_size,
            stats.is_healthy,
            stats.performance.writes,
            stats.performance.avg_write_time
        ));
    }

    // Ada logs out of us-1: the next run can host her again.
    servers[1].release("ada")?;
    println!(
        "\nthe records stay in Redis: redis-cli --scan --pattern '{{{namespace}}}:*' lists them; \
         run again to continue, or pass --cleanup to remove them"
    );
    Ok(())
}
