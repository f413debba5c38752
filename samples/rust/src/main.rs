//! A minimal streaming chat: each line on stdin is a user message; the reply streams to stdout.
//! usage: dsrt-chat MODEL_DIR
use std::io::{BufRead, Write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: dsrt-chat MODEL_DIR")?;
    dsrt::check_version()?;
    let model = dsrt::Model::load(&dir, &dsrt::ModelOptions::default())?;
    let engine = dsrt::Engine::new(&model, 0)?;
    let mut session = dsrt::Session::new(&engine)?;
    let mut params = model.gen_params();
    params.max_new_tokens = 256;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let msg = format!(r#"[{{"role":"user","content":{}}}]"#, json_string(&line));
        session.append_chat(&msg, true)?;
        for event in session.stream(&params)? {
            let event = event?;
            print!("{}", event.text);
            std::io::stdout().flush()?;
        }
        println!();
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
