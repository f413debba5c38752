// A minimal streaming chat over the dsrt C# binding: each stdin line is a user message; the reply streams
// to stdout; Ctrl-C stops the current reply.
// build: mcs -r:Dsrt.dll -out:Chat.exe Chat.cs      run: mono Chat.exe MODEL_DIR   (or dotnet run: Chat.csproj)
using System;
using System.Text;
using System.Threading;
using Dsrt;

static class Chat {
  static string Json(string s) {
    var sb = new StringBuilder("\"");
    foreach (char c in s) {
      if (c == '"' || c == '\\') sb.Append('\\').Append(c);
      else if (c < 0x20) sb.AppendFormat("\\u{0:x4}", (int)c);
      else sb.Append(c);
    }
    return sb.Append('"').ToString();
  }

  static int Main(string[] args) {
    if (args.Length < 1) {
      Console.Error.WriteLine("usage: mono Chat.exe MODEL_DIR");
      return 2;
    }
    try {
      Library.CheckVersion();
    } catch (DsrtException e) {
      Console.Error.WriteLine("dsrt: " + e.Message);
      return 1;
    }
    using (var model = new Model(args[0]))
    using (var engine = new Engine(model))
    using (var session = new Session(engine)) {
      var p = model.DefaultGenParams();
      p.MaxNewTokens = 256;
      CancellationTokenSource cts = null;
      Console.CancelKeyPress += (o, e) => { if (cts != null) { e.Cancel = true; cts.Cancel(); } };
      string line;
      while ((line = Console.ReadLine()) != null) {
        if (line.Length == 0) continue;
        session.AppendChat("[{\"role\":\"user\",\"content\":" + Json(line) + "}]");
        using (cts = new CancellationTokenSource()) {
          foreach (var ev in session.Stream(p, cts.Token)) Console.Write(ev.Text);
        }
        cts = null;
        Console.WriteLine();
      }
    }
    return 0;
  }
}
