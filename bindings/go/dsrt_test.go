package dsrt

// The binding test script shared by every language (see bindings/rust/tests/binding.rs). Needs
// DSRT_TEST_MODEL and DSRT_GOLDEN.
import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

func collect(t *testing.T, s *Session, ctx context.Context, p GenParams) ([]int32, string, int) {
	st, err := s.Stream(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	var toks []int32
	var text strings.Builder
	fin := FinishNone
	for st.Next() {
		ev := st.Event()
		if ev.Token >= 0 {
			toks = append(toks, ev.Token)
		}
		text.WriteString(ev.Text)
		fin = ev.Finish
	}
	if st.Err() != nil {
		t.Fatal(st.Err())
	}
	return toks, text.String(), fin
}

func TestBindingScript(t *testing.T) {
	dir := os.Getenv("DSRT_TEST_MODEL")
	goldenText, err := os.ReadFile(os.Getenv("DSRT_GOLDEN"))
	if dir == "" || err != nil {
		t.Fatal("DSRT_TEST_MODEL and DSRT_GOLDEN must name a tiny model and its golden ids")
	}
	var golden []int32
	for _, f := range strings.Split(strings.TrimSpace(string(goldenText)), ",") {
		v, _ := strconv.Atoi(f)
		golden = append(golden, int32(v))
	}
	passed, failed := 0, 0
	check := func(name string, ok bool) {
		if ok {
			passed++
		} else {
			failed++
			t.Errorf("FAILED: %s", name)
		}
	}
	check("version", CheckVersion() == nil && strings.HasPrefix(Version(), "0.1"))
	sizesOK := true
	for id, sz := range BindingStructSizes {
		if StructSize(id) != sz {
			sizesOK = false
		}
	}
	check("struct sizes", sizesOK)

	m, err := LoadModel(dir, ModelOptions{Threads: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	text := "你好，世界！ 👨‍👩‍👧 👍🏽 naïve café"
	ids, err := m.Tokenize(text, false, true)
	back, err2 := m.Detokenize(ids, false)
	check("tokenize/detokenize round trip (CJK, emoji)", err == nil && err2 == nil && bytes.Equal(back, []byte(text)))

	e, err := NewEngine(m, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	s, _ := NewSession(e)
	s.AppendTokens([]int32{0, 5, 17, 42})
	var greedy []int32
	for range golden {
		s.Eval()
		tok, _ := s.SampleGreedy()
		greedy = append(greedy, tok)
		s.AppendTokens([]int32{tok})
	}
	check("greedy tokens equal the C API's", fmt.Sprint(greedy) == fmt.Sprint(golden))

	p := m.GenParams()
	p.Temperature = 0
	p.MaxNewTokens = 12
	p.IgnoreEOS = true
	ctx := context.Background()
	a, _ := NewSession(e)
	a.AppendText("Hello world", true)
	pulled, pulledText, fin := collect(t, a, ctx, p)
	b, _ := NewSession(e)
	b.AppendText("Hello world", true)
	var pushed []int32
	var pushedText strings.Builder
	err = b.Generate(ctx, p, func(ev Event) bool {
		if ev.Token >= 0 {
			pushed = append(pushed, ev.Token)
		}
		pushedText.WriteString(ev.Text)
		return true
	})
	check("pull == push", err == nil && fmt.Sprint(pulled) == fmt.Sprint(pushed) && pulledText == pushedText.String() && fin == FinishLength)
	if em, err := NewEngineMTP(m, 0, 2); err != nil {
		check("an engine with MTP drafts gives the same tokens", false)
	} else {
		d, _ := NewSession(em)
		d.AppendText("Hello world", true)
		drafted, draftedText, _ := collect(t, d, ctx, p)
		check("an engine with MTP drafts gives the same tokens", fmt.Sprint(drafted) == fmt.Sprint(pulled) && draftedText == pulledText)
		d.Close()
		em.Close()
	}
	_, err = NewEngineMTP(m, 0, 9)
	check("mtpDrafts out of range is an error", err != nil)

	// Cancel from another goroutine through a context.
	cctx, cancel := context.WithCancel(ctx)
	pc := p
	pc.MaxNewTokens = 0
	c, _ := NewSession(e)
	c.AppendText("Once upon a time", true)
	st, err := c.Stream(cctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	n, after, cancelled := 0, 0, false
	finish := FinishNone
	for st.Next() {
		ev := st.Event()
		if ev.Done {
			finish = ev.Finish
			break
		}
		n++
		if cancelled {
			after++
		}
		if n == 5 {
			fired := make(chan struct{})
			go func() { cancel(); close(fired) }()
			<-fired
			cancelled = true
		}
	}
	check("cancel from another goroutine", finish == FinishCancelled && after <= 3)

	rs := []rune(pulledText)
	stop := string(rs[len(rs)/2 : len(rs)/2+2])
	ps := p
	ps.StopStrings = []string{stop}
	d, _ := NewSession(e)
	d.AppendText("Hello world", true)
	_, stoppedText, sfin := collect(t, d, ctx, ps)
	check("stop string", stop != "" && !strings.Contains(stoppedText, stop) && sfin == FinishStopString)

	p8 := p
	p8.MaxNewTokens = 6
	e1, _ := NewSession(e)
	e1.AppendChat(`[{"role":"user","content":"Tell me a story."}]`, true)
	collect(t, e1, ctx, p8)
	blob, err := e1.SaveState()
	e1.AppendChat(`[{"role":"user","content":"And then?"}]`, true)
	want, _, _ := collect(t, e1, ctx, p8)
	e2, _ := NewSession(e)
	err2 = e2.LoadState(blob)
	e2.AppendChat(`[{"role":"user","content":"And then?"}]`, true)
	got, _, _ := collect(t, e2, ctx, p8)
	check("state save/restore", err == nil && err2 == nil && len(want) > 0 && fmt.Sprint(want) == fmt.Sprint(got))

	_, err = LoadModel("/nonexistent/model", ModelOptions{})
	de, ok := err.(*Error)
	check("error path", ok && de.Status != 0 && de.Message != "")

	fmt.Printf("%d passed, %d failed\n", passed, failed)
}
