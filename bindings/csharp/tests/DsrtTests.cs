// The binding test script shared by every language (see bindings/rust/tests/binding.rs).
// usage: mono DsrtTests.exe MODEL_DIR GOLDEN_FILE    (prints "N passed, N failed"; exit 1 on failure)
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using System.Threading;
using Dsrt;

static class DsrtTests {
  static int passed, failed;
  static void Check(string name, bool ok) {
    if (ok) passed++;
    else { failed++; Console.Error.WriteLine("FAILED: " + name); }
  }

  static void Collect(Session s, GenParams p, out List<int> toks, out string text, out Finish fin) {
    toks = new List<int>();
    var sb = new StringBuilder();
    fin = Finish.None;
    foreach (var ev in s.Stream(p)) {
      if (ev.Token >= 0) toks.Add(ev.Token);
      sb.Append(ev.Text);
      fin = ev.Finish;
    }
    text = sb.ToString();
  }

  static int Main(string[] args) {
    string dir = args[0];
    int[] golden = File.ReadAllText(args[1]).Trim().Split(',').Select(int.Parse).ToArray();
    try {
      Library.CheckVersion();
      Check("version", Library.Version.StartsWith("0.1"));
    } catch (DsrtException) { Check("version", false); }
    bool sizes = true;
    for (int id = 1; id <= 9; id++) if (Library.StructSize(id) != Library.BindingStructSize(id)) sizes = false;
    Check("struct sizes", sizes);

    using (var model = new Model(dir, 2))
    using (var engine = new Engine(model)) {
      string text = "你好，世界！ 👨‍👩‍👧 👍🏽 naïve café";
      var ids = model.Tokenize(text);
      Check("tokenize/detokenize round trip (CJK, emoji)", Encoding.UTF8.GetString(model.Detokenize(ids)) == text);

      using (var s = new Session(engine)) {
        s.AppendTokens(new[] { 0, 5, 17, 42 });
        var greedy = new List<int>();
        for (int i = 0; i < golden.Length; i++) {
          s.Eval();
          int t = s.SampleGreedy();
          greedy.Add(t);
          s.AppendTokens(new[] { t });
        }
        Check("greedy tokens equal the C API's", greedy.SequenceEqual(golden));
      }

      var p = model.DefaultGenParams();
      p.Temperature = 0;
      p.MaxNewTokens = 12;
      p.IgnoreEos = true;
      List<int> pulled; string pulledText; Finish fin;
      using (var a = new Session(engine)) {
        a.AppendText("Hello world");
        Collect(a, p, out pulled, out pulledText, out fin);
      }
      var pushed = new List<int>();
      var pushedText = new StringBuilder();
      using (var b = new Session(engine)) {
        b.AppendText("Hello world");
        b.Generate(p, ev => { if (ev.Token >= 0) pushed.Add(ev.Token); pushedText.Append(ev.Text); return true; });
      }
      Check("pull == push", pulled.SequenceEqual(pushed) && pulledText == pushedText.ToString() && fin == Finish.Length);
      using (var em = new Engine(model, 0, 2))
      using (var d = new Session(em)) {
        d.AppendText("Hello world");
        List<int> drafted; string draftedText; Finish dfin;
        Collect(d, p, out drafted, out draftedText, out dfin);
        Check("an engine with MTP drafts gives the same tokens", drafted.SequenceEqual(pulled) && draftedText == pulledText);
      }
      try { new Engine(model, 0, 9).Dispose(); Check("mtpDrafts out of range is an error", false); }
      catch (DsrtException) { Check("mtpDrafts out of range is an error", true); }

      // Cancel from another thread through a CancellationToken.
      using (var c = new Session(engine))
      using (var cts = new CancellationTokenSource()) {
        c.AppendText("Once upon a time");
        var pc = model.DefaultGenParams();
        pc.Temperature = 0;
        pc.MaxNewTokens = 0;
        pc.IgnoreEos = true;
        int n = 0, after = 0;
        bool sent = false;
        Finish f = Finish.None;
        foreach (var ev in c.Stream(pc, cts.Token)) {
          if (ev.Done) { f = ev.Finish; break; }
          n++;
          if (sent) after++;
          if (n == 5) {
            var th = new Thread(() => cts.Cancel());
            th.Start();
            th.Join();
            sent = true;
          }
        }
        Check("cancel from another thread", f == Finish.Cancelled && after <= 3);
      }

      // A stop string never appears in the text.
      string stop = pulledText.Substring(pulledText.Length / 2, Math.Min(2, pulledText.Length - pulledText.Length / 2));
      if (char.IsHighSurrogate(stop[stop.Length - 1])) stop = stop.Substring(0, stop.Length - 1);
      if (char.IsLowSurrogate(stop[0])) stop = pulledText.Substring(pulledText.Length / 2 + 1, 1);
      var ps = model.DefaultGenParams();
      ps.Temperature = 0; ps.MaxNewTokens = 12; ps.IgnoreEos = true;
      ps.StopStrings = new[] { stop };
      using (var d = new Session(engine)) {
        d.AppendText("Hello world");
        List<int> t2; string stopped; Finish sf;
        Collect(d, ps, out t2, out stopped, out sf);
        Check("stop string", stop.Length > 0 && !stopped.Contains(stop) && sf == Finish.StopString);
      }

      // State save/restore then continue == the uninterrupted run.
      var p8 = model.DefaultGenParams();
      p8.Temperature = 0; p8.MaxNewTokens = 6; p8.IgnoreEos = true;
      List<int> want, got, ignore; string tx; Finish fx;
      byte[] blob;
      using (var e1 = new Session(engine)) {
        e1.AppendChat("[{\"role\":\"user\",\"content\":\"Tell me a story.\"}]");
        Collect(e1, p8, out ignore, out tx, out fx);
        blob = e1.SaveState();
        e1.AppendChat("[{\"role\":\"user\",\"content\":\"And then?\"}]");
        Collect(e1, p8, out want, out tx, out fx);
      }
      using (var e2 = new Session(engine)) {
        e2.LoadState(blob);
        e2.AppendChat("[{\"role\":\"user\",\"content\":\"And then?\"}]");
        Collect(e2, p8, out got, out tx, out fx);
      }
      Check("state save/restore", want.Count > 0 && want.SequenceEqual(got));
    }
    try {
      new Model("/nonexistent/model");
      Check("error path", false);
    } catch (DsrtException e) {
      Check("error path", e.Status != 0 && e.Message.Length > 0);
    }
    Console.WriteLine(passed + " passed, " + failed + " failed");
    return failed == 0 ? 0 : 1;
  }
}
