//! Rust bindings for dsrt (include/dsrt.h). Handles own their C objects and free them on Drop; the C side
//! counts references, so a Session keeps its Engine and Model alive even after those are dropped here.
//! `Model`, `Engine` and `CancelToken` are Send + Sync (the C contract makes them thread-safe); a
//! `Session` is Send but used by one thread at a time.
pub mod sys;

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;

/// A failed call: the status code and this thread's error text, read in the same call sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: i32,
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", status_name(self.status), self.message)
    }
}
impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn status_name(s: i32) -> String {
    unsafe { CStr::from_ptr(sys::dsrt_status_string(s)) }.to_string_lossy().into_owned()
}

fn check(st: sys::dsrt_status) -> Result<()> {
    if st == sys::DSRT_OK {
        Ok(())
    } else {
        let message = unsafe { CStr::from_ptr(sys::dsrt_last_error()) }.to_string_lossy().into_owned();
        Err(Error { status: st, message })
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error { status: 1, message: "string contains a NUL byte".into() })
}

/// The library's version string ("0.1.0 (git ..., cpu only)").
pub fn version() -> String {
    unsafe { CStr::from_ptr(sys::dsrt_version_string()) }.to_string_lossy().into_owned()
}

/// Fails when the loaded libdsrt cannot serve this binding's header version.
pub fn check_version() -> Result<()> {
    check(unsafe { sys::dsrt_check_version(sys::DSRT_API_VERSION) })
}

/// The library's size of a public struct (`sys::DSRT_STRUCT_*`), for layout checks.
pub fn struct_size(id: i32) -> usize {
    unsafe { sys::dsrt_struct_size(id) }
}

/// A flag any thread may set to stop a load or a generation turn at its next step.
pub struct CancelToken(*mut sys::dsrt_cancel);
unsafe impl Send for CancelToken {}
unsafe impl Sync for CancelToken {}

impl CancelToken {
    pub fn new() -> Result<Arc<CancelToken>> {
        let mut p = ptr::null_mut();
        check(unsafe { sys::dsrt_cancel_create(&mut p) })?;
        Ok(Arc::new(CancelToken(p)))
    }
    pub fn trigger(&self) {
        unsafe { sys::dsrt_cancel_trigger(self.0) }
    }
    pub fn reset(&self) {
        unsafe { sys::dsrt_cancel_reset(self.0) }
    }
}
impl Drop for CancelToken {
    fn drop(&mut self) {
        unsafe { sys::dsrt_cancel_free(self.0) }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    pub threads: i32,
    pub tokenizer_only: bool,
}

pub struct Model(*mut sys::dsrt_model);
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    pub fn load(dir: &str, opt: &ModelOptions) -> Result<Model> {
        let d = cstring(dir)?;
        let mut p: sys::dsrt_model_params = unsafe { std::mem::zeroed() };
        unsafe { sys::dsrt_model_params_init(&mut p, std::mem::size_of::<sys::dsrt_model_params>()) };
        p.n_threads = opt.threads;
        p.tokenizer_only = opt.tokenizer_only as i32;
        let mut m = ptr::null_mut();
        check(unsafe { sys::dsrt_model_load(d.as_ptr(), &p, &mut m) })?;
        Ok(Model(m))
    }

    pub fn info(&self) -> Result<sys::dsrt_model_info> {
        let mut i = sys::dsrt_model_info { struct_size: std::mem::size_of::<sys::dsrt_model_info>() as u32, ..Default::default() };
        check(unsafe { sys::dsrt_model_info_get(self.0, &mut i) })?;
        Ok(i)
    }

    /// Ids of the text's bytes; `add_special` adds BOS as the tokenizer asks, `parse_special` matches
    /// special-token strings.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>> {
        let flags = (add_special as i32) * sys::DSRT_TOKENIZE_ADD_SPECIAL + (parse_special as i32) * sys::DSRT_TOKENIZE_PARSE_SPECIAL;
        let mut ids = vec![0i32; text.len() + 8];
        let mut n = 0usize;
        check(unsafe {
            sys::dsrt_tokenize(self.0, text.as_ptr() as *const c_char, text.len(), flags, ids.as_mut_ptr(), ids.len(), &mut n)
        })?;
        ids.truncate(n);
        Ok(ids)
    }

    /// The tokens' bytes (may end inside a UTF-8 character).
    pub fn detokenize(&self, ids: &[i32], skip_special: bool) -> Result<Vec<u8>> {
        let flags = if skip_special { sys::DSRT_DETOKENIZE_SKIP_SPECIAL } else { 0 };
        let mut n = 0usize;
        let st = unsafe { sys::dsrt_detokenize(self.0, ids.as_ptr(), ids.len(), flags, ptr::null_mut(), 0, &mut n) };
        if st != sys::DSRT_OK && st != sys::DSRT_ERR_BUFFER_TOO_SMALL {
            check(st)?;
        }
        let mut buf = vec![0u8; n];
        check(unsafe {
            sys::dsrt_detokenize(self.0, ids.as_ptr(), ids.len(), flags, buf.as_mut_ptr() as *mut c_char, buf.len(), &mut n)
        })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Renders messages (a JSON array) with the model's chat template.
    pub fn chat_apply(&self, messages_json: &str, add_generation_prompt: bool) -> Result<String> {
        let msgs = cstring(messages_json)?;
        let mut out: *mut c_char = ptr::null_mut();
        let flags = if add_generation_prompt { sys::DSRT_CHAT_ADD_GENERATION_PROMPT } else { 0 };
        check(unsafe { sys::dsrt_chat_apply(self.0, msgs.as_ptr(), ptr::null(), ptr::null(), flags, &mut out) })?;
        let s = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
        unsafe { sys::dsrt_free(out as *mut c_void) };
        Ok(s)
    }

    /// Generation defaults of this model (generation_config.json).
    pub fn gen_params(&self) -> GenParams {
        let mut p: sys::dsrt_gen_params = unsafe { std::mem::zeroed() };
        unsafe { sys::dsrt_gen_params_init(&mut p, std::mem::size_of::<sys::dsrt_gen_params>(), self.0) };
        GenParams {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            seed: None,
            ignore_eos: false,
            stop_strings: vec![],
            stop_tokens: vec![],
            cancel: None,
        }
    }
}
impl Drop for Model {
    fn drop(&mut self) {
        unsafe { sys::dsrt_model_free(self.0) }
    }
}

pub struct Engine(*mut sys::dsrt_engine);
unsafe impl Send for Engine {}
unsafe impl Sync for Engine {}

impl Engine {
    /// max_tokens: KV capacity over all sessions (0: the default).
    pub fn new(model: &Model, max_tokens: i32) -> Result<Engine> {
        Engine::with_mtp(model, max_tokens, 0)
    }
    /// mtp_drafts: 1-4 turns on speculative decoding with the model's MTP module (same output, fewer steps).
    pub fn with_mtp(model: &Model, max_tokens: i32, mtp_drafts: i32) -> Result<Engine> {
        let mut p: sys::dsrt_engine_params = unsafe { std::mem::zeroed() };
        unsafe { sys::dsrt_engine_params_init(&mut p, std::mem::size_of::<sys::dsrt_engine_params>()) };
        p.max_tokens = max_tokens;
        p.mtp_drafts = mtp_drafts;
        let mut e = ptr::null_mut();
        check(unsafe { sys::dsrt_engine_create(model.0, &p, &mut e) })?;
        Ok(Engine(e))
    }
    pub fn stats(&self) -> Result<sys::dsrt_engine_stats> {
        let mut s = sys::dsrt_engine_stats { struct_size: std::mem::size_of::<sys::dsrt_engine_stats>() as u32, ..Default::default() };
        check(unsafe { sys::dsrt_engine_stats_get(self.0, &mut s) })?;
        Ok(s)
    }
}
impl Drop for Engine {
    fn drop(&mut self) {
        unsafe { sys::dsrt_engine_free(self.0) }
    }
}

/// Settings of one generation turn.
#[derive(Clone, Default)]
pub struct GenParams {
    pub max_new_tokens: i32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub stop_strings: Vec<String>,
    pub stop_tokens: Vec<i32>,
    pub cancel: Option<Arc<CancelToken>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    None,
    Eos,
    StopString,
    StopToken,
    Length,
    Cancelled,
    ContextFull,
    Error,
}

impl Finish {
    fn from(v: i32) -> Finish {
        match v {
            1 => Finish::Eos,
            2 => Finish::StopString,
            3 => Finish::StopToken,
            4 => Finish::Length,
            5 => Finish::Cancelled,
            6 => Finish::ContextFull,
            7 => Finish::Error,
            _ => Finish::None,
        }
    }
}

/// One streamed event: a token with its text delta (complete UTF-8), or the end of the turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub token: Option<i32>,
    pub text: String,
    pub done: bool,
    pub finish: Finish,
}

impl Event {
    unsafe fn from_raw(ev: &sys::dsrt_event) -> Event {
        let bytes = if ev.text_len == 0 { &[][..] } else { std::slice::from_raw_parts(ev.text as *const u8, ev.text_len) };
        Event {
            token: if ev.token >= 0 { Some(ev.token) } else { None },
            // The library hands out complete UTF-8 only.
            text: String::from_utf8_lossy(bytes).into_owned(),
            done: ev.r#type == sys::DSRT_EVENT_DONE,
            finish: Finish::from(ev.finish_reason),
        }
    }
}

/// The C view of GenParams; owns the strings and arrays it points into while a call uses it.
struct RawGen {
    p: sys::dsrt_gen_params,
    _strings: Vec<CString>,
    _ptrs: Vec<*const c_char>,
    _stop_tokens: Vec<i32>,
}

impl GenParams {
    fn raw(&self) -> Result<RawGen> {
        let mut p: sys::dsrt_gen_params = unsafe { std::mem::zeroed() };
        unsafe { sys::dsrt_gen_params_init(&mut p, std::mem::size_of::<sys::dsrt_gen_params>(), ptr::null()) };
        p.max_new_tokens = self.max_new_tokens;
        p.temperature = self.temperature;
        p.top_k = self.top_k;
        p.top_p = if self.top_p > 0.0 { self.top_p } else { 1.0 };
        p.min_p = self.min_p;
        if let Some(s) = self.seed {
            p.has_seed = 1;
            p.seed = s;
        }
        p.ignore_eos = self.ignore_eos as i32;
        let strings = self.stop_strings.iter().map(|s| cstring(s)).collect::<Result<Vec<_>>>()?;
        let ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        let stop_tokens = self.stop_tokens.clone();
        p.stop_strings = ptrs.as_ptr();
        p.n_stop_strings = ptrs.len();
        p.stop_tokens = stop_tokens.as_ptr();
        p.n_stop_tokens = stop_tokens.len();
        p.cancel = self.cancel.as_ref().map_or(ptr::null_mut(), |c| c.0);
        Ok(RawGen { p, _strings: strings, _ptrs: ptrs, _stop_tokens: stop_tokens })
    }
}

pub struct Session(*mut sys::dsrt_session);
unsafe impl Send for Session {}

impl Session {
    pub fn new(engine: &Engine) -> Result<Session> {
        let mut s = ptr::null_mut();
        check(unsafe { sys::dsrt_session_create(engine.0, ptr::null(), &mut s) })?;
        Ok(Session(s))
    }
    pub fn append_tokens(&mut self, ids: &[i32]) -> Result<()> {
        check(unsafe { sys::dsrt_session_append_tokens(self.0, ids.as_ptr(), ids.len()) })
    }
    pub fn append_text(&mut self, text: &str, add_special: bool) -> Result<()> {
        let flags = sys::DSRT_TOKENIZE_PARSE_SPECIAL + (add_special as i32) * sys::DSRT_TOKENIZE_ADD_SPECIAL;
        check(unsafe { sys::dsrt_session_append_text(self.0, text.as_ptr() as *const c_char, text.len(), flags) })
    }
    /// Adds chat messages (JSON array); only what the cache lacks is appended.
    pub fn append_chat(&mut self, messages_json: &str, add_generation_prompt: bool) -> Result<()> {
        let m = cstring(messages_json)?;
        let flags = if add_generation_prompt { sys::DSRT_CHAT_ADD_GENERATION_PROMPT } else { 0 };
        check(unsafe { sys::dsrt_session_append_chat(self.0, m.as_ptr(), ptr::null(), flags) })
    }
    pub fn eval(&mut self) -> Result<()> {
        check(unsafe { sys::dsrt_session_eval(self.0, ptr::null_mut()) })
    }
    /// Greedy token from the last logits (not appended).
    pub fn sample_greedy(&mut self) -> Result<i32> {
        let mut t = 0;
        check(unsafe { sys::dsrt_session_sample(self.0, ptr::null(), &mut t) })?;
        Ok(t)
    }
    pub fn truncate(&mut self, n_keep: usize) -> Result<()> {
        check(unsafe { sys::dsrt_session_truncate(self.0, n_keep) })
    }
    pub fn reset(&mut self) -> Result<()> {
        check(unsafe { sys::dsrt_session_reset(self.0) })
    }
    pub fn stats(&self) -> Result<sys::dsrt_session_stats> {
        let mut s = sys::dsrt_session_stats { struct_size: std::mem::size_of::<sys::dsrt_session_stats>() as u32, ..Default::default() };
        check(unsafe { sys::dsrt_session_stats_get(self.0, &mut s) })?;
        Ok(s)
    }
    pub fn fork(&mut self) -> Result<Session> {
        let mut s = ptr::null_mut();
        check(unsafe { sys::dsrt_session_fork(self.0, &mut s) })?;
        Ok(Session(s))
    }
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        let mut buf: *mut c_void = ptr::null_mut();
        let mut n = 0usize;
        check(unsafe { sys::dsrt_session_state_save(self.0, &mut buf, &mut n) })?;
        let v = unsafe { std::slice::from_raw_parts(buf as *const u8, n) }.to_vec();
        unsafe { sys::dsrt_free(buf) };
        Ok(v)
    }
    pub fn load_state(&mut self, blob: &[u8]) -> Result<()> {
        check(unsafe { sys::dsrt_session_state_load(self.0, blob.as_ptr() as *const c_void, blob.len()) })
    }

    /// Starts a turn and returns an iterator over its events (pull).
    pub fn stream(&mut self, p: &GenParams) -> Result<Stream<'_>> {
        let raw = p.raw()?;
        check(unsafe { sys::dsrt_session_start(self.0, &raw.p) })?;
        Ok(Stream { session: self, done: false })
    }

    /// Runs a turn on this thread, calling `f` for every event (push); `f` returns false to stop. A panic
    /// in `f` stops the turn and resumes on this thread after the library returns.
    pub fn generate<F: FnMut(&Event) -> bool>(&mut self, p: &GenParams, mut f: F) -> Result<()> {
        struct Ctx<'a> {
            f: &'a mut dyn FnMut(&Event) -> bool,
            panic: Option<Box<dyn std::any::Any + Send>>,
        }
        unsafe extern "C" fn tramp(ev: *const sys::dsrt_event, user: *mut c_void) -> i32 {
            let ctx = &mut *(user as *mut Ctx);
            if ctx.panic.is_some() {
                return 1;
            }
            let e = Event::from_raw(&*ev);
            match catch_unwind(AssertUnwindSafe(|| (ctx.f)(&e))) {
                Ok(keep_going) => (!keep_going) as i32,
                Err(p) => {
                    ctx.panic = Some(p);
                    1
                }
            }
        }
        let raw = p.raw()?;
        let mut ctx = Ctx { f: &mut f, panic: None };
        let st = unsafe { sys::dsrt_session_generate(self.0, &raw.p, Some(tramp), &mut ctx as *mut Ctx as *mut c_void) };
        if let Some(p) = ctx.panic.take() {
            resume_unwind(p);
        }
        check(st)
    }
}
impl Drop for Session {
    fn drop(&mut self) {
        unsafe { sys::dsrt_session_free(self.0) }
    }
}

/// Iterator over a turn's events; ends after the DONE event.
pub struct Stream<'a> {
    session: &'a mut Session,
    done: bool,
}

impl<'a> Iterator for Stream<'a> {
    type Item = Result<Event>;
    fn next(&mut self) -> Option<Result<Event>> {
        if self.done {
            return None;
        }
        let mut ev: sys::dsrt_event = unsafe { std::mem::zeroed() };
        ev.struct_size = std::mem::size_of::<sys::dsrt_event>() as u32;
        if let Err(e) = check(unsafe { sys::dsrt_session_next(self.session.0, &mut ev) }) {
            self.done = true;
            return Some(Err(e));
        }
        let e = unsafe { Event::from_raw(&ev) };
        self.done = e.done;
        Some(Ok(e))
    }
}
