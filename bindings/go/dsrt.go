// Package dsrt is the Go binding of dsrt (include/dsrt.h), an inference runtime for DeepSeek-V3-architecture
// models. Every C call goes through a shim in this file's preamble that also copies dsrt_last_error() in
// the same C call: a goroutine may move to another OS thread between two cgo calls, and the error text is
// per thread. Handles have Close(); a finalizer frees what was not closed.
//
// cgo finds libdsrt through pkg-config (dsrt.pc): installed (cmake --install build), or the build tree's
// PKG_CONFIG_PATH=<build>/pkgconfig. The .pc file records an RPATH, so programs run without LD_LIBRARY_PATH.
package dsrt

/*
#cgo pkg-config: dsrt
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "dsrt.h"

typedef struct {
  dsrt_status st;
  char err[1024];
} shim_res;

static void shim_set(shim_res *r, dsrt_status st) {
  r->st = st;
  r->err[0] = 0;
  if (st != DSRT_OK) {
    strncpy(r->err, dsrt_last_error(), sizeof r->err - 1);
    r->err[sizeof r->err - 1] = 0;
  }
}

static shim_res shim_check_version(void) { shim_res r; shim_set(&r, dsrt_check_version(DSRT_API_VERSION)); return r; }

static shim_res shim_model_load(const char *dir, int32_t threads, int32_t tok_only, dsrt_model **out) {
  dsrt_model_params p;
  dsrt_model_params_init(&p, sizeof p);
  p.n_threads = threads;
  p.tokenizer_only = tok_only;
  shim_res r;
  shim_set(&r, dsrt_model_load(dir, &p, out));
  return r;
}
static shim_res shim_model_info(const dsrt_model *m, dsrt_model_info *i) {
  i->struct_size = sizeof *i;
  shim_res r; shim_set(&r, dsrt_model_info_get(m, i)); return r;
}
static shim_res shim_tokenize(const dsrt_model *m, const char *t, size_t n, int32_t flags, int32_t *ids, size_t cap, size_t *n_out) {
  shim_res r; shim_set(&r, dsrt_tokenize(m, t, n, flags, ids, cap, n_out)); return r;
}
static shim_res shim_detokenize(const dsrt_model *m, const int32_t *ids, size_t n, int32_t flags, char *buf, size_t cap, size_t *n_out) {
  shim_res r; shim_set(&r, dsrt_detokenize(m, ids, n, flags, buf, cap, n_out)); return r;
}
static shim_res shim_chat_apply(const dsrt_model *m, const char *msgs, int32_t flags, char **out) {
  shim_res r; shim_set(&r, dsrt_chat_apply(m, msgs, NULL, NULL, flags, out)); return r;
}
static shim_res shim_engine_create(dsrt_model *m, int32_t max_tokens, int32_t mtp_drafts, dsrt_engine **out) {
  dsrt_engine_params p;
  dsrt_engine_params_init(&p, sizeof p);
  p.max_tokens = max_tokens;
  p.mtp_drafts = mtp_drafts;
  shim_res r; shim_set(&r, dsrt_engine_create(m, &p, out)); return r;
}
static shim_res shim_engine_stats(const dsrt_engine *e, dsrt_engine_stats *s) {
  s->struct_size = sizeof *s;
  shim_res r; shim_set(&r, dsrt_engine_stats_get(e, s)); return r;
}
static shim_res shim_session_create(dsrt_engine *e, dsrt_session **out) {
  shim_res r; shim_set(&r, dsrt_session_create(e, NULL, out)); return r;
}
static shim_res shim_append_tokens(dsrt_session *s, const int32_t *t, size_t n) {
  shim_res r; shim_set(&r, dsrt_session_append_tokens(s, t, n)); return r;
}
static shim_res shim_append_text(dsrt_session *s, const char *t, size_t n, int32_t flags) {
  shim_res r; shim_set(&r, dsrt_session_append_text(s, t, n, flags)); return r;
}
static shim_res shim_append_chat(dsrt_session *s, const char *m, int32_t flags) {
  shim_res r; shim_set(&r, dsrt_session_append_chat(s, m, NULL, flags)); return r;
}
static shim_res shim_eval(dsrt_session *s) { shim_res r; shim_set(&r, dsrt_session_eval(s, NULL)); return r; }
static shim_res shim_sample(dsrt_session *s, int32_t *tok) { shim_res r; shim_set(&r, dsrt_session_sample(s, NULL, tok)); return r; }
static shim_res shim_stats(const dsrt_session *s, dsrt_session_stats *st) {
  st->struct_size = sizeof *st;
  shim_res r; shim_set(&r, dsrt_session_stats_get(s, st)); return r;
}
static shim_res shim_fork(dsrt_session *s, dsrt_session **out) { shim_res r; shim_set(&r, dsrt_session_fork(s, out)); return r; }
static shim_res shim_state_save(dsrt_session *s, void **buf, size_t *n) { shim_res r; shim_set(&r, dsrt_session_state_save(s, buf, n)); return r; }
static shim_res shim_state_load(dsrt_session *s, const void *buf, size_t n) { shim_res r; shim_set(&r, dsrt_session_state_load(s, buf, n)); return r; }
static shim_res shim_cancel_create(dsrt_cancel **out) { shim_res r; shim_set(&r, dsrt_cancel_create(out)); return r; }

// Generation settings as the Go side passes them; strings and arrays live in C memory during the call.
typedef struct {
  int32_t max_new_tokens, top_k, ignore_eos, has_seed;
  float temperature, top_p, min_p;
  uint64_t seed;
  const char *const *stop_strings;
  size_t n_stop_strings;
  const int32_t *stop_tokens;
  size_t n_stop_tokens;
  dsrt_cancel *cancel;
} shim_gen;

static void shim_fill(dsrt_gen_params *p, const shim_gen *g) {
  dsrt_gen_params_init(p, sizeof *p, NULL);
  p->max_new_tokens = g->max_new_tokens;
  p->temperature = g->temperature;
  p->top_k = g->top_k;
  p->top_p = g->top_p;
  p->min_p = g->min_p;
  p->has_seed = g->has_seed;
  p->seed = g->seed;
  p->ignore_eos = g->ignore_eos;
  p->stop_strings = g->stop_strings;
  p->n_stop_strings = g->n_stop_strings;
  p->stop_tokens = g->stop_tokens;
  p->n_stop_tokens = g->n_stop_tokens;
  p->cancel = g->cancel;
}
static shim_res shim_start(dsrt_session *s, const shim_gen *g) {
  dsrt_gen_params p;
  shim_fill(&p, g);
  shim_res r; shim_set(&r, dsrt_session_start(s, &p)); return r;
}
static shim_res shim_next(dsrt_session *s, dsrt_event *ev) {
  ev->struct_size = sizeof *ev;
  shim_res r; shim_set(&r, dsrt_session_next(s, ev)); return r;
}
static void shim_gen_params_defaults(const dsrt_model *m, shim_gen *g) {
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, m);
  memset(g, 0, sizeof *g);
  g->max_new_tokens = p.max_new_tokens;
  g->temperature = p.temperature;
  g->top_k = p.top_k;
  g->top_p = p.top_p;
  g->min_p = p.min_p;
}

extern int32_t dsrtGoEvent(dsrt_event *ev, uintptr_t handle);
static int32_t shim_event_tramp(const dsrt_event *ev, void *user) { return dsrtGoEvent((dsrt_event *)ev, (uintptr_t)user); }
static shim_res shim_generate(dsrt_session *s, const shim_gen *g, uintptr_t handle) {
  dsrt_gen_params p;
  shim_fill(&p, g);
  shim_res r; shim_set(&r, dsrt_session_generate(s, &p, shim_event_tramp, (void *)handle)); return r;
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"runtime/cgo"
	"unsafe"
)

// Error is a failed call: the dsrt status and the message of that same call.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", C.GoString(C.dsrt_status_string(C.dsrt_status(e.Status))), e.Message)
}

func errOf(r C.shim_res) error {
	if r.st == C.DSRT_OK {
		return nil
	}
	return &Error{Status: int(r.st), Message: C.GoString(&r.err[0])}
}

// Version is the library's version string.
func Version() string { return C.GoString(C.dsrt_version_string()) }

// CheckVersion fails when the loaded libdsrt cannot serve this binding's header version.
func CheckVersion() error { return errOf(C.shim_check_version()) }

// StructSize is the library's sizeof of a public struct (DSRT_STRUCT_* ids).
func StructSize(id int) int { return int(C.dsrt_struct_size(C.int32_t(id))) }

// Layout sizes of the C structs as this binding (cgo) sees them, for layout checks.
var BindingStructSizes = map[int]int{
	1: int(unsafe.Sizeof(C.dsrt_model_params{})), 2: int(unsafe.Sizeof(C.dsrt_model_info{})),
	3: int(unsafe.Sizeof(C.dsrt_engine_params{})), 4: int(unsafe.Sizeof(C.dsrt_engine_stats{})),
	5: int(unsafe.Sizeof(C.dsrt_session_params{})), 6: int(unsafe.Sizeof(C.dsrt_sampling_params{})),
	7: int(unsafe.Sizeof(C.dsrt_session_stats{})), 8: int(unsafe.Sizeof(C.dsrt_gen_params{})),
	9: int(unsafe.Sizeof(C.dsrt_event{})),
}

// CancelToken stops a generation turn at its next step; Trigger is safe from any goroutine.
type CancelToken struct{ p *C.dsrt_cancel }

func NewCancelToken() (*CancelToken, error) {
	var p *C.dsrt_cancel
	if err := errOf(C.shim_cancel_create(&p)); err != nil {
		return nil, err
	}
	c := &CancelToken{p}
	runtime.SetFinalizer(c, (*CancelToken).Close)
	return c, nil
}
func (c *CancelToken) Trigger() { C.dsrt_cancel_trigger(c.p) }
func (c *CancelToken) Reset()   { C.dsrt_cancel_reset(c.p) }
func (c *CancelToken) Close() {
	if c.p != nil {
		C.dsrt_cancel_free(c.p)
		c.p = nil
	}
}

// Model is a loaded checkpoint (weights and tokenizer); safe to share between goroutines.
type Model struct{ p *C.dsrt_model }

type ModelOptions struct {
	Threads       int
	TokenizerOnly bool
}

func LoadModel(dir string, opt ModelOptions) (*Model, error) {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	var p *C.dsrt_model
	tok := 0
	if opt.TokenizerOnly {
		tok = 1
	}
	if err := errOf(C.shim_model_load(cdir, C.int32_t(opt.Threads), C.int32_t(tok), &p)); err != nil {
		return nil, err
	}
	m := &Model{p}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

func (m *Model) Close() {
	if m.p != nil {
		C.dsrt_model_free(m.p)
		m.p = nil
	}
}

// VocabSize is the number of embedding rows.
func (m *Model) VocabSize() (int, error) {
	var i C.dsrt_model_info
	if err := errOf(C.shim_model_info(m.p, &i)); err != nil {
		return 0, err
	}
	return int(i.n_vocab), nil
}

// Tokenize returns the ids of text; addSpecial adds BOS as the tokenizer asks, parseSpecial matches
// special-token strings.
func (m *Model) Tokenize(text string, addSpecial, parseSpecial bool) ([]int32, error) {
	flags := 0
	if addSpecial {
		flags |= 1
	}
	if parseSpecial {
		flags |= 2
	}
	ct := C.CString(text)
	defer C.free(unsafe.Pointer(ct))
	ids := make([]int32, len(text)+8)
	var n C.size_t
	if err := errOf(C.shim_tokenize(m.p, ct, C.size_t(len(text)), C.int32_t(flags), (*C.int32_t)(unsafe.Pointer(&ids[0])), C.size_t(len(ids)), &n)); err != nil {
		return nil, err
	}
	return ids[:n], nil
}

// Detokenize returns the tokens' bytes (may end inside a UTF-8 character).
func (m *Model) Detokenize(ids []int32, skipSpecial bool) ([]byte, error) {
	flags := 0
	if skipSpecial {
		flags = 1
	}
	if len(ids) == 0 {
		return nil, nil
	}
	var n C.size_t
	r := C.shim_detokenize(m.p, (*C.int32_t)(unsafe.Pointer(&ids[0])), C.size_t(len(ids)), C.int32_t(flags), nil, 0, &n)
	if r.st != C.DSRT_OK && r.st != C.DSRT_ERR_BUFFER_TOO_SMALL {
		return nil, errOf(r)
	}
	buf := C.malloc(n + 1)
	defer C.free(buf)
	if err := errOf(C.shim_detokenize(m.p, (*C.int32_t)(unsafe.Pointer(&ids[0])), C.size_t(len(ids)), C.int32_t(flags), (*C.char)(buf), n+1, &n)); err != nil {
		return nil, err
	}
	return C.GoBytes(buf, C.int(n)), nil
}

// ChatApply renders messages (a JSON array) with the model's chat template.
func (m *Model) ChatApply(messagesJSON string, addGenerationPrompt bool) (string, error) {
	cm := C.CString(messagesJSON)
	defer C.free(unsafe.Pointer(cm))
	flags := 0
	if addGenerationPrompt {
		flags = 1
	}
	var out *C.char
	if err := errOf(C.shim_chat_apply(m.p, cm, C.int32_t(flags), &out)); err != nil {
		return "", err
	}
	defer C.dsrt_free(unsafe.Pointer(out))
	return C.GoString(out), nil
}

// GenParams returns this model's generation defaults (generation_config.json).
func (m *Model) GenParams() GenParams {
	var g C.shim_gen
	C.shim_gen_params_defaults(m.p, &g)
	return GenParams{MaxNewTokens: int(g.max_new_tokens), Temperature: float32(g.temperature), TopK: int(g.top_k),
		TopP: float32(g.top_p), MinP: float32(g.min_p)}
}

// Engine holds the KV cache and batches every session's work; safe to share between goroutines.
type Engine struct{ p *C.dsrt_engine }

func NewEngine(m *Model, maxTokens int) (*Engine, error) { return NewEngineMTP(m, maxTokens, 0) }

// NewEngineMTP: mtpDrafts 1-4 turns on speculative decoding with the model's MTP module (same output, fewer steps).
func NewEngineMTP(m *Model, maxTokens, mtpDrafts int) (*Engine, error) {
	var p *C.dsrt_engine
	if err := errOf(C.shim_engine_create(m.p, C.int32_t(maxTokens), C.int32_t(mtpDrafts), &p)); err != nil {
		return nil, err
	}
	e := &Engine{p}
	runtime.SetFinalizer(e, (*Engine).Close)
	return e, nil
}

func (e *Engine) Close() {
	if e.p != nil {
		C.dsrt_engine_free(e.p)
		e.p = nil
	}
}

// Session is one conversation; use it from one goroutine at a time.
type Session struct{ p *C.dsrt_session }

func NewSession(e *Engine) (*Session, error) {
	var p *C.dsrt_session
	if err := errOf(C.shim_session_create(e.p, &p)); err != nil {
		return nil, err
	}
	return wrapSession(p), nil
}

func wrapSession(p *C.dsrt_session) *Session {
	s := &Session{p}
	runtime.SetFinalizer(s, (*Session).Close)
	return s
}

func (s *Session) Close() {
	if s.p != nil {
		C.dsrt_session_free(s.p)
		s.p = nil
	}
}

func (s *Session) AppendTokens(ids []int32) error {
	if len(ids) == 0 {
		return nil
	}
	return errOf(C.shim_append_tokens(s.p, (*C.int32_t)(unsafe.Pointer(&ids[0])), C.size_t(len(ids))))
}

func (s *Session) AppendText(text string, addSpecial bool) error {
	ct := C.CString(text)
	defer C.free(unsafe.Pointer(ct))
	flags := 2
	if addSpecial {
		flags |= 1
	}
	return errOf(C.shim_append_text(s.p, ct, C.size_t(len(text)), C.int32_t(flags)))
}

// AppendChat adds chat messages (JSON array); only what the cache lacks is appended.
func (s *Session) AppendChat(messagesJSON string, addGenerationPrompt bool) error {
	cm := C.CString(messagesJSON)
	defer C.free(unsafe.Pointer(cm))
	flags := 0
	if addGenerationPrompt {
		flags = 1
	}
	return errOf(C.shim_append_chat(s.p, cm, C.int32_t(flags)))
}

func (s *Session) Eval() error { return errOf(C.shim_eval(s.p)) }

// SampleGreedy returns the argmax of the last logits (not appended).
func (s *Session) SampleGreedy() (int32, error) {
	var t C.int32_t
	err := errOf(C.shim_sample(s.p, &t))
	return int32(t), err
}

func (s *Session) Fork() (*Session, error) {
	var p *C.dsrt_session
	if err := errOf(C.shim_fork(s.p, &p)); err != nil {
		return nil, err
	}
	return wrapSession(p), nil
}

func (s *Session) SaveState() ([]byte, error) {
	var buf unsafe.Pointer
	var n C.size_t
	if err := errOf(C.shim_state_save(s.p, &buf, &n)); err != nil {
		return nil, err
	}
	defer C.dsrt_free(buf)
	return C.GoBytes(buf, C.int(n)), nil
}

func (s *Session) LoadState(blob []byte) error {
	if len(blob) == 0 {
		return errors.New("empty state")
	}
	cb := C.CBytes(blob)
	defer C.free(cb)
	return errOf(C.shim_state_load(s.p, cb, C.size_t(len(blob))))
}

// GenParams are one turn's settings.
type GenParams struct {
	MaxNewTokens int
	Temperature  float32
	TopK         int
	TopP         float32
	MinP         float32
	Seed         *uint64
	IgnoreEOS    bool
	StopStrings  []string
	StopTokens   []int32
}

// Finish reasons (DSRT_FINISH_*).
const (
	FinishNone = iota
	FinishEOS
	FinishStopString
	FinishStopToken
	FinishLength
	FinishCancelled
	FinishContextFull
	FinishError
)

// Event is one streamed token with its text delta (complete UTF-8), or the end of the turn.
type Event struct {
	Token  int32 // -1 if none
	Text   string
	Done   bool
	Finish int
}

func eventOf(ev *C.dsrt_event) Event {
	return Event{Token: int32(ev.token), Text: C.GoStringN(ev.text, C.int(ev.text_len)), Done: ev._type == C.DSRT_EVENT_DONE,
		Finish: int(ev.finish_reason)}
}

// cgen holds a turn's settings in C memory for the duration of a call.
type cgen struct {
	g     C.shim_gen
	alloc []unsafe.Pointer
}

func (p GenParams) toC(cancel *CancelToken) *cgen {
	c := &cgen{}
	c.g.max_new_tokens = C.int32_t(p.MaxNewTokens)
	c.g.temperature = C.float(p.Temperature)
	c.g.top_k = C.int32_t(p.TopK)
	c.g.top_p = C.float(p.TopP)
	if p.TopP <= 0 {
		c.g.top_p = 1
	}
	c.g.min_p = C.float(p.MinP)
	if p.Seed != nil {
		c.g.has_seed = 1
		c.g.seed = C.uint64_t(*p.Seed)
	}
	if p.IgnoreEOS {
		c.g.ignore_eos = 1
	}
	if len(p.StopStrings) > 0 {
		arr := C.malloc(C.size_t(len(p.StopStrings)) * C.size_t(unsafe.Sizeof(uintptr(0))))
		c.alloc = append(c.alloc, arr)
		ptrs := (*[1 << 20]*C.char)(arr)[:len(p.StopStrings):len(p.StopStrings)]
		for i, s := range p.StopStrings {
			ptrs[i] = C.CString(s)
			c.alloc = append(c.alloc, unsafe.Pointer(ptrs[i]))
		}
		c.g.stop_strings = (**C.char)(arr)
		c.g.n_stop_strings = C.size_t(len(p.StopStrings))
	}
	if len(p.StopTokens) > 0 {
		arr := C.malloc(C.size_t(len(p.StopTokens)) * 4)
		c.alloc = append(c.alloc, arr)
		copy((*[1 << 20]int32)(arr)[:len(p.StopTokens):len(p.StopTokens)], p.StopTokens)
		c.g.stop_tokens = (*C.int32_t)(arr)
		c.g.n_stop_tokens = C.size_t(len(p.StopTokens))
	}
	if cancel != nil {
		c.g.cancel = cancel.p
	}
	return c
}

func (c *cgen) free() {
	for _, p := range c.alloc {
		C.free(p)
	}
}

// watch triggers the token when ctx ends; the returned func stops watching and returns once the watcher
// has exited, so the token may be freed after it (a watcher still about to trigger would write freed memory).
func watch(ctx context.Context, tok *CancelToken) func() {
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		select {
		case <-ctx.Done():
			tok.Trigger()
		case <-done:
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

// Stream is a pull iterator over a turn: for st.Next() { ev := st.Event() }; then st.Err().
type Stream struct {
	ctx    context.Context
	s      *Session
	cancel *CancelToken
	stop   func()
	ev     Event
	err    error
	done   bool
}

// Stream starts a turn; ctx cancels it (the turn then ends with FinishCancelled).
func (s *Session) Stream(ctx context.Context, p GenParams) (*Stream, error) {
	tok, err := NewCancelToken()
	if err != nil {
		return nil, err
	}
	c := p.toC(tok)
	defer c.free()
	if err := errOf(C.shim_start(s.p, &c.g)); err != nil {
		tok.Close()
		return nil, err
	}
	return &Stream{ctx: ctx, s: s, cancel: tok, stop: watch(ctx, tok)}, nil
}

func (st *Stream) Next() bool {
	if st.done {
		return false
	}
	if st.ctx.Err() != nil {
		// The watcher triggers too, but it is a goroutine the scheduler may run late: a ctx that has
		// ended stops the turn at this step, not some steps on.
		st.cancel.Trigger()
	}
	var ev C.dsrt_event
	if err := errOf(C.shim_next(st.s.p, &ev)); err != nil {
		st.err = err
		st.finish()
		return false
	}
	st.ev = eventOf(&ev)
	if st.ev.Done {
		st.finish()
	}
	return true
}

func (st *Stream) finish() {
	st.done = true
	st.stop()
	st.cancel.Close()
}

func (st *Stream) Event() Event { return st.ev }
func (st *Stream) Err() error   { return st.err }

type pushCtx struct {
	fn func(Event) bool
}

//export dsrtGoEvent
func dsrtGoEvent(ev *C.dsrt_event, handle C.uintptr_t) C.int32_t {
	pc := cgo.Handle(handle).Value().(*pushCtx)
	if pc.fn(eventOf(ev)) {
		return 0
	}
	return 1
}

// Generate runs a turn on this goroutine, calling fn for every event (push); fn returns false to stop.
func (s *Session) Generate(ctx context.Context, p GenParams, fn func(Event) bool) error {
	tok, err := NewCancelToken()
	if err != nil {
		return err
	}
	defer tok.Close()
	stop := watch(ctx, tok)
	defer stop()
	c := p.toC(tok)
	defer c.free()
	h := cgo.NewHandle(&pushCtx{fn})
	defer h.Delete()
	return errOf(C.shim_generate(s.p, &c.g, C.uintptr_t(h)))
}
