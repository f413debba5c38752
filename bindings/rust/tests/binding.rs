// The binding test script shared by every language: version, struct sizes, text round trip, greedy ==
// the C API's, pull == push, cancel from another thread, stop strings, state save/restore, an error path.
// Needs DSRT_TEST_MODEL (a tiny model directory with tokenizer) and DSRT_GOLDEN (greedy ids after the
// tokens 0,5,17,42, from `dsrt generate ... -n 8 --print-ids`).
use dsrt::*;
use std::sync::Arc;

struct Tally {
    passed: u32,
    failed: u32,
}
impl Tally {
    fn check(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            eprintln!("FAILED: {name}");
        }
    }
}

fn collect(s: &mut Session, p: &GenParams) -> (Vec<i32>, String, Finish) {
    let mut toks = vec![];
    let mut text = String::new();
    let mut fin = Finish::None;
    for ev in s.stream(p).expect("start") {
        let ev = ev.expect("next");
        if let Some(t) = ev.token {
            toks.push(t);
        }
        text += &ev.text;
        fin = ev.finish;
    }
    (toks, text, fin)
}

#[test]
fn binding_script() {
    let dir = std::env::var("DSRT_TEST_MODEL").expect("DSRT_TEST_MODEL");
    let golden: Vec<i32> = std::fs::read_to_string(std::env::var("DSRT_GOLDEN").expect("DSRT_GOLDEN"))
        .unwrap()
        .trim()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let mut t = Tally { passed: 0, failed: 0 };

    t.check("version", check_version().is_ok() && version().starts_with("0.1"));
    use std::mem::size_of;
    t.check("struct sizes",
        struct_size(sys::DSRT_STRUCT_MODEL_PARAMS) == size_of::<sys::dsrt_model_params>()
            && struct_size(sys::DSRT_STRUCT_MODEL_INFO) == size_of::<sys::dsrt_model_info>()
            && struct_size(sys::DSRT_STRUCT_ENGINE_PARAMS) == size_of::<sys::dsrt_engine_params>()
            && struct_size(sys::DSRT_STRUCT_ENGINE_STATS) == size_of::<sys::dsrt_engine_stats>()
            && struct_size(sys::DSRT_STRUCT_SESSION_PARAMS) == size_of::<sys::dsrt_session_params>()
            && struct_size(sys::DSRT_STRUCT_SAMPLING_PARAMS) == size_of::<sys::dsrt_sampling_params>()
            && struct_size(sys::DSRT_STRUCT_SESSION_STATS) == size_of::<sys::dsrt_session_stats>()
            && struct_size(sys::DSRT_STRUCT_GEN_PARAMS) == size_of::<sys::dsrt_gen_params>()
            && struct_size(sys::DSRT_STRUCT_EVENT) == size_of::<sys::dsrt_event>());

    let model = Arc::new(Model::load(&dir, &ModelOptions { threads: 2, ..Default::default() }).expect("load"));
    let text = "你好，世界！ 👨‍👩‍👧 👍🏽 naïve café";
    let ids = model.tokenize(text, false, true).unwrap();
    t.check("tokenize/detokenize round trip (CJK, emoji)", model.detokenize(&ids, false).unwrap() == text.as_bytes());

    let engine = Arc::new(Engine::new(&model, 0).unwrap());
    let mut s = Session::new(&engine).unwrap();
    s.append_tokens(&[0, 5, 17, 42]).unwrap();
    let mut greedy = vec![];
    for _ in 0..golden.len() {
        s.eval().unwrap();
        let tok = s.sample_greedy().unwrap();
        greedy.push(tok);
        s.append_tokens(&[tok]).unwrap();
    }
    t.check("greedy tokens equal the C API's", greedy == golden);

    let mut p = model.gen_params();
    p.temperature = 0.0;
    p.max_new_tokens = 12;
    p.ignore_eos = true;
    let mut a = Session::new(&engine).unwrap();
    a.append_text("Hello world", true).unwrap();
    let (pulled, pulled_text, fin) = collect(&mut a, &p);
    let mut b = Session::new(&engine).unwrap();
    b.append_text("Hello world", true).unwrap();
    let mut pushed = vec![];
    let mut pushed_text = String::new();
    b.generate(&p, |ev| {
        if let Some(tk) = ev.token {
            pushed.push(tk);
        }
        pushed_text += &ev.text;
        true
    })
    .unwrap();
    t.check("pull == push", pulled == pushed && pulled_text == pushed_text && fin == Finish::Length);
    {
        let em = Arc::new(Engine::with_mtp(&model, 0, 2).unwrap());
        let mut d = Session::new(&em).unwrap();
        d.append_text("Hello world", true).unwrap();
        let (drafted, drafted_text, _) = collect(&mut d, &p);
        t.check("an engine with MTP drafts gives the same tokens", drafted == pulled && drafted_text == pulled_text);
        t.check("mtp_drafts out of range is an error", Engine::with_mtp(&model, 0, 9).is_err());
    }

    // Cancel from another thread: the turn ends as cancelled within a few steps.
    let cancel = CancelToken::new().unwrap();
    let mut pc = p.clone();
    pc.max_new_tokens = 0;
    pc.cancel = Some(cancel.clone());
    let mut c = Session::new(&engine).unwrap();
    c.append_text("Once upon a time", true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let killer = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            rx.recv().unwrap();
            cancel.trigger();
            done_tx.send(()).unwrap();
        })
    };
    let mut n = 0;
    let mut after = 0;
    let mut finish = Finish::None;
    let mut sent = false;
    for ev in c.stream(&pc).unwrap() {
        let ev = ev.unwrap();
        if ev.done {
            finish = ev.finish;
            break;
        }
        n += 1;
        if sent {
            after += 1;
        }
        if n == 5 {
            // Trigger on the other thread and wait until it has: what follows counts tokens after the
            // trigger, not after a thread that a busy machine may schedule late.
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
            sent = true;
        }
    }
    killer.join().unwrap();
    t.check("cancel from another thread", finish == Finish::Cancelled && after <= 3);

    // A stop string never appears in the text.
    let stop = pulled_text.chars().skip(pulled_text.chars().count() / 2).take(2).collect::<String>();
    let mut ps = p.clone();
    ps.stop_strings = vec![stop.clone()];
    let mut d = Session::new(&engine).unwrap();
    d.append_text("Hello world", true).unwrap();
    let (_, stopped_text, sfin) = collect(&mut d, &ps);
    t.check("stop string", !stop.is_empty() && !stopped_text.contains(&stop) && sfin == Finish::StopString);

    // State save/restore then continue == the uninterrupted run.
    let mut p8 = p.clone();
    p8.max_new_tokens = 6;
    let mut e1 = Session::new(&engine).unwrap();
    e1.append_chat(r#"[{"role":"user","content":"Tell me a story."}]"#, true).unwrap();
    collect(&mut e1, &p8);
    let blob = e1.save_state().unwrap();
    e1.append_chat(r#"[{"role":"user","content":"And then?"}]"#, true).unwrap();
    let (want, _, _) = collect(&mut e1, &p8);
    let mut e2 = Session::new(&engine).unwrap();
    e2.load_state(&blob).unwrap();
    e2.append_chat(r#"[{"role":"user","content":"And then?"}]"#, true).unwrap();
    let (got, _, _) = collect(&mut e2, &p8);
    t.check("state save/restore", want == got && !want.is_empty());

    // An error path with a message.
    match Model::load("/nonexistent/model", &ModelOptions::default()) {
        Err(e) => t.check("error path", e.status != 0 && !e.message.is_empty()),
        Ok(_) => t.check("error path", false),
    }
    // A panicking callback does not unwind into C; it resumes here.
    let mut f = Session::new(&engine).unwrap();
    f.append_text("Hi", true).unwrap();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));  // the panic below is expected: keep the log quiet
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.generate(&p, |_| panic!("callback panic"))));
    std::panic::set_hook(hook);
    t.check("callback panic caught and resumed", r.is_err());

    println!("{} passed, {} failed", t.passed, t.failed);
    assert_eq!(t.failed, 0);
}
