use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Serialize, Deserialize, Clone)]
struct Cell {
    id: u64,
    x: f32,
    y: f32,
    kind: u8,
    name: String,
}

fn main() -> Result<(), StorageError> {
    let store = Store::open(StorageConfig::sqlite("/tmp/meas/m.db").max_size(Some(1 << 30)))?;
    let bytes: Vec<u8> = (0..50_000_000u32).map(|i| (i % 251) as u8).collect();
    let cells: Vec<Cell> = (0..1_000_000u64)
        .map(|i| Cell {
            id: i,
            x: i as f32,
            y: 1.5,
            kind: (i % 7) as u8,
            name: format!("cell{i}"),
        })
        .collect();
    let none = SaveOptions::new().compression(0);
    for (what, opts) in [
        ("ron", none.clone()),
        ("binary", none.clone().format(Format::Binary)),
    ] {
        let t = Instant::now();
        store.save("bytes", &bytes, &opts)?;
        println!("Vec<u8> 50 MB typed {what}: {:?}", t.elapsed());
        let t = Instant::now();
        store.save("cells", &cells, &opts)?;
        let size = store.get_metadata("cells")?.unwrap().size;
        println!(
            "Vec<Cell> 1M typed {what}: {:?} ({} MB)",
            t.elapsed(),
            size / 1_000_000
        );
    }
    let t = Instant::now();
    store.save_bytes("raw", &bytes, &none)?;
    println!("save_bytes 50 MB: {:?}", t.elapsed());
    let t = Instant::now();
    let encoded = postcard::to_allocvec(&cells).unwrap();
    store.save_bytes("raw", &encoded, &none)?;
    println!("postcard by hand + save_bytes cells: {:?}", t.elapsed());
    // Quota: a value over the quota.
    let small = Store::open(StorageConfig::sqlite("/tmp/meas/q.db").max_size(Some(10_000_000)))?;
    let t = Instant::now();
    let r = small.save("bytes", &bytes, &none.clone().format(Format::Binary));
    println!(
        "over quota typed binary: {:?} -> {:?}",
        t.elapsed(),
        r.err().map(|e| e.to_string())
    );
    let t = Instant::now();
    let r = small.save_bytes("bytes", &bytes, &none);
    println!(
        "over quota save_bytes: {:?} -> {:?}",
        t.elapsed(),
        r.err().map(|e| e.to_string())
    );
    Ok(())
}
