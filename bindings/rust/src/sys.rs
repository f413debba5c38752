//! Hand-written declarations of include/dsrt.h (no bindgen: no crates can be fetched). Every struct's size
//! is checked against the library's `dsrt_struct_size` by the tests.
#![allow(non_camel_case_types, dead_code)]
use std::os::raw::{c_char, c_void};

pub type dsrt_status = i32;
pub const DSRT_OK: dsrt_status = 0;
pub const DSRT_ERR_BUFFER_TOO_SMALL: dsrt_status = 8;
pub const DSRT_API_VERSION: u32 = (0 << 16) | 1;

pub const DSRT_STRUCT_MODEL_PARAMS: i32 = 1;
pub const DSRT_STRUCT_MODEL_INFO: i32 = 2;
pub const DSRT_STRUCT_ENGINE_PARAMS: i32 = 3;
pub const DSRT_STRUCT_ENGINE_STATS: i32 = 4;
pub const DSRT_STRUCT_SESSION_PARAMS: i32 = 5;
pub const DSRT_STRUCT_SAMPLING_PARAMS: i32 = 6;
pub const DSRT_STRUCT_SESSION_STATS: i32 = 7;
pub const DSRT_STRUCT_GEN_PARAMS: i32 = 8;
pub const DSRT_STRUCT_EVENT: i32 = 9;

pub const DSRT_TOKENIZE_ADD_SPECIAL: i32 = 1;
pub const DSRT_TOKENIZE_PARSE_SPECIAL: i32 = 2;
pub const DSRT_DETOKENIZE_SKIP_SPECIAL: i32 = 1;
pub const DSRT_CHAT_ADD_GENERATION_PROMPT: i32 = 1;
pub const DSRT_EVENT_TOKEN: i32 = 1;
pub const DSRT_EVENT_DONE: i32 = 2;

#[repr(C)]
pub struct dsrt_model {
    _p: [u8; 0],
}
#[repr(C)]
pub struct dsrt_engine {
    _p: [u8; 0],
}
#[repr(C)]
pub struct dsrt_session {
    _p: [u8; 0],
}
#[repr(C)]
pub struct dsrt_cancel {
    _p: [u8; 0],
}

pub type dsrt_progress_fn = Option<unsafe extern "C" fn(i32, u64, u64, *mut c_void) -> i32>;
pub type dsrt_event_fn = Option<unsafe extern "C" fn(*const dsrt_event, *mut c_void) -> i32>;

#[repr(C)]
pub struct dsrt_model_params {
    pub struct_size: u32,
    pub backend: i32,
    pub n_threads: i32,
    pub validate_scales: i32,
    pub load_mtp: i32,
    pub progress_fn: dsrt_progress_fn,
    pub progress_user_data: *mut c_void,
    pub cancel: *mut dsrt_cancel,
    pub tokenizer_only: i32,
    pub use_mmap: i32,
    pub devices: *const i32,
    pub n_devices: i32,
    pub device_memory: u64,
    pub device_memory_fraction: f32,
    pub experts_compute: i32,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct dsrt_model_info {
    pub struct_size: u32,
    pub n_vocab: i32,
    pub n_embd: i32,
    pub n_layers: i32,
    pub n_heads: i32,
    pub n_routed_experts: i32,
    pub n_experts_per_tok: i32,
    pub n_mtp_layers: i32,
    pub n_ctx_train: i32,
    pub weights_format: i32,
    pub backend: i32,
    pub bos_token_id: i32,
    pub eos_token_id: i32,
    pub n_params: u64,
    pub weight_bytes: u64,
}

#[repr(C)]
pub struct dsrt_engine_params {
    pub struct_size: u32,
    pub max_tokens: i32,
    pub max_batch_tokens: i32,
    pub attention: i32,
    pub precision: i32,
    pub kv_memory_fraction: f32,
    pub mtp_drafts: i32,
    pub tp: i32,
    pub ep: i32,
    pub dp_attention: i32,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct dsrt_engine_stats {
    pub struct_size: u32,
    pub n_sessions: i32,
    pub kv_pages_used: i32,
    pub kv_pages_total: i32,
    pub kv_page_tokens: i32,
    pub n_steps: u64,
    pub n_tokens: u64,
    pub max_batch_seqs: u64,
    pub forward_seconds: f64,
    pub mtp_drafted: u64,
    pub mtp_accepted: u64,
    pub device_seconds: f64,
    pub graph_replays: u64,
    pub graph_captures: u64,
    pub expert_hits: u64,
    pub expert_misses: u64,
    pub expert_bytes_copied: u64,
    pub expert_bytes_read_in_host: u64,
    pub experts_on_cpu: u64,
    pub expert_bytes_cpu: u64,
}

#[repr(C)]
pub struct dsrt_session_params {
    pub struct_size: u32,
    pub max_ctx: i32,
    pub logits_all: i32,
    pub seed: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct dsrt_session_stats {
    pub struct_size: u32,
    pub n_tokens: i32,
    pub n_pending: i32,
    pub n_pages: i32,
    pub n_evaluated: u64,
    pub prompt_tokens: i32,
    pub reused_tokens: i32,
    pub generated_tokens: i32,
    pub ttft_seconds: f64,
    pub decode_tokens_per_second: f64,
    pub mtp_drafted: i32,
    pub mtp_accepted: i32,
}

#[repr(C)]
pub struct dsrt_sampling_params {
    pub struct_size: u32,
    pub temperature: f32,
}

#[repr(C)]
pub struct dsrt_gen_params {
    pub struct_size: u32,
    pub max_new_tokens: i32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub penalty_window: i32,
    pub has_seed: i32,
    pub seed: u64,
    pub ignore_eos: i32,
    pub skip_special: i32,
    pub stop_tokens: *const i32,
    pub n_stop_tokens: usize,
    pub stop_strings: *const *const c_char,
    pub n_stop_strings: usize,
    pub logit_bias_tokens: *const i32,
    pub logit_bias_values: *const f32,
    pub n_logit_bias: usize,
    pub cancel: *mut dsrt_cancel,
}

#[repr(C)]
pub struct dsrt_event {
    pub struct_size: u32,
    pub r#type: i32,
    pub token: i32,
    pub text: *const c_char,
    pub text_len: usize,
    pub finish_reason: i32,
    pub status: dsrt_status,
    pub n_generated: i32,
}

extern "C" {
    pub fn dsrt_api_version() -> u32;
    pub fn dsrt_check_version(header_api_version: u32) -> dsrt_status;
    pub fn dsrt_version_string() -> *const c_char;
    pub fn dsrt_status_string(s: dsrt_status) -> *const c_char;
    pub fn dsrt_last_error() -> *const c_char;
    pub fn dsrt_free(p: *mut c_void);
    pub fn dsrt_struct_size(id: i32) -> usize;

    pub fn dsrt_cancel_create(out: *mut *mut dsrt_cancel) -> dsrt_status;
    pub fn dsrt_cancel_trigger(c: *mut dsrt_cancel);
    pub fn dsrt_cancel_reset(c: *mut dsrt_cancel);
    pub fn dsrt_cancel_free(c: *mut dsrt_cancel);

    pub fn dsrt_model_params_init(p: *mut dsrt_model_params, size: usize);
    pub fn dsrt_model_load(dir: *const c_char, p: *const dsrt_model_params, out: *mut *mut dsrt_model) -> dsrt_status;
    pub fn dsrt_model_free(m: *mut dsrt_model);
    pub fn dsrt_model_info_get(m: *const dsrt_model, out: *mut dsrt_model_info) -> dsrt_status;

    pub fn dsrt_engine_params_init(p: *mut dsrt_engine_params, size: usize);
    pub fn dsrt_engine_create(m: *mut dsrt_model, p: *const dsrt_engine_params, out: *mut *mut dsrt_engine) -> dsrt_status;
    pub fn dsrt_engine_free(e: *mut dsrt_engine);
    pub fn dsrt_engine_stats_get(e: *const dsrt_engine, out: *mut dsrt_engine_stats) -> dsrt_status;

    pub fn dsrt_session_params_init(p: *mut dsrt_session_params, size: usize);
    pub fn dsrt_session_create(e: *mut dsrt_engine, p: *const dsrt_session_params, out: *mut *mut dsrt_session) -> dsrt_status;
    pub fn dsrt_session_free(s: *mut dsrt_session);
    pub fn dsrt_session_append_tokens(s: *mut dsrt_session, tokens: *const i32, n: usize) -> dsrt_status;
    pub fn dsrt_session_eval(s: *mut dsrt_session, cancel: *mut dsrt_cancel) -> dsrt_status;
    pub fn dsrt_session_truncate(s: *mut dsrt_session, n_keep: usize) -> dsrt_status;
    pub fn dsrt_session_reset(s: *mut dsrt_session) -> dsrt_status;
    pub fn dsrt_session_stats_get(s: *const dsrt_session, out: *mut dsrt_session_stats) -> dsrt_status;
    pub fn dsrt_sampling_params_init(p: *mut dsrt_sampling_params, size: usize);
    pub fn dsrt_session_sample(s: *mut dsrt_session, p: *const dsrt_sampling_params, token: *mut i32) -> dsrt_status;

    pub fn dsrt_tokenize(m: *const dsrt_model, text: *const c_char, len: usize, flags: i32, tokens: *mut i32, cap: usize,
                         n_out: *mut usize) -> dsrt_status;
    pub fn dsrt_detokenize(m: *const dsrt_model, tokens: *const i32, n: usize, flags: i32, buf: *mut c_char, cap: usize,
                           n_out: *mut usize) -> dsrt_status;
    pub fn dsrt_chat_apply(m: *const dsrt_model, messages: *const c_char, tools: *const c_char, kwargs: *const c_char,
                           flags: i32, out: *mut *mut c_char) -> dsrt_status;

    pub fn dsrt_session_append_text(s: *mut dsrt_session, text: *const c_char, len: usize, flags: i32) -> dsrt_status;
    pub fn dsrt_session_append_chat(s: *mut dsrt_session, messages: *const c_char, tools: *const c_char, flags: i32)
                                    -> dsrt_status;
    pub fn dsrt_gen_params_init(p: *mut dsrt_gen_params, size: usize, m: *const dsrt_model);
    pub fn dsrt_session_start(s: *mut dsrt_session, p: *const dsrt_gen_params) -> dsrt_status;
    pub fn dsrt_session_next(s: *mut dsrt_session, ev: *mut dsrt_event) -> dsrt_status;
    pub fn dsrt_session_generate(s: *mut dsrt_session, p: *const dsrt_gen_params, f: dsrt_event_fn, user: *mut c_void)
                                 -> dsrt_status;
    pub fn dsrt_session_cancel(s: *mut dsrt_session);
    pub fn dsrt_session_fork(s: *mut dsrt_session, out: *mut *mut dsrt_session) -> dsrt_status;
    pub fn dsrt_session_state_save(s: *mut dsrt_session, buf: *mut *mut c_void, n: *mut usize) -> dsrt_status;
    pub fn dsrt_session_state_load(s: *mut dsrt_session, buf: *const c_void, n: usize) -> dsrt_status;
}
