//! The README's Rust blocks are compiled and run as doctests (`src/lib.rs`, module `readme`,
//! warnings denied). This checks what a doctest cannot: that each block is a program a user
//! can paste whole (its own `main`, no hidden `# ` lines, which GitHub would show), that it
//! says what it did, and that a Bevy app in it ends itself.

const README: &str = include_str!("../README.md");

/// The ```rust blocks, with the line each starts on.
fn rust_blocks() -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in README.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```rust") => {
                current = Some((n + 1, String::new()))
            }
            None => {}
            Some(_) if line.trim_start().starts_with("```") => blocks.push(current.take().unwrap()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed code block in README.md");
    blocks
}

#[test]
fn every_readme_block_is_a_whole_program_that_prints_and_exits() {
    let blocks = rust_blocks();
    assert!(
        blocks.len() >= 4,
        "the README lost its examples: {}",
        blocks.len()
    );
    for (line, code) in &blocks {
        assert!(
            code.contains("fn main()"),
            "README.md line {line}: no `fn main`, so it does not compile when pasted"
        );
        assert!(
            !code
                .lines()
                .any(|l| l.trim_start().starts_with("# ") || l.trim() == "#"),
            "README.md line {line}: a hidden doctest line, which readers would see"
        );
        assert!(
            code.contains("println!"),
            "README.md line {line}: prints nothing, so a reader cannot see what it did"
        );
        if code.contains("App::new()") {
            assert!(
                code.contains(".run()"),
                "README.md line {line}: the app is built but never run"
            );
            assert!(
                code.contains("AppExit::Success"),
                "README.md line {line}: the app never exits by itself"
            );
        }
    }
}

#[test]
fn the_readme_is_the_doctested_one() {
    let lib = include_str!("../src/lib.rs");
    assert!(
        lib.contains("#[doc = include_str!(\"../README.md\")]")
            && lib.contains("#[doc(test(attr(deny(warnings))))]"),
        "src/lib.rs no longer doctests README.md with warnings denied"
    );
}

#[test]
fn other_code_blocks_say_their_language() {
    // A bare ``` block would be doctested as Rust and fail; shell and TOML say so.
    let mut open = false;
    for (n, line) in README.lines().enumerate() {
        if let Some(rest) = line.trim_start().strip_prefix("```") {
            if !open {
                assert!(
                    !rest.trim().is_empty(),
                    "README.md line {}: a code block without a language",
                    n + 1
                );
            }
            open = !open;
        }
    }
}
