// C# binding of dsrt (include/dsrt.h): P/Invoke (Cdecl) over libdsrt, one SafeHandle per handle type,
// IDisposable objects, UTF-8 marshalled by hand, callbacks through delegates kept alive while registered,
// IEnumerable over streamed tokens, CancellationToken wired to a dsrt cancel token.
// Builds with Debian's mono-mcs; runs with mono.
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;

namespace Dsrt {

public class DsrtException : Exception {
  public int Status { get; private set; }
  public DsrtException(int status, string message) : base(message) { Status = status; }
}

public enum Finish { None = 0, Eos = 1, StopString = 2, StopToken = 3, Length = 4, Cancelled = 5, ContextFull = 6, Error = 7 }

// Streamed event: a token with its complete-UTF-8 text delta, or the end of the turn.
public struct Event {
  public int Token;  // -1 if none
  public string Text;
  public bool Done;
  public Finish Finish;
}

public class GenParams {
  public int MaxNewTokens = 256;
  public float Temperature = 0f;
  public int TopK = 0;
  public float TopP = 1f;
  public float MinP = 0f;
  public ulong? Seed = null;
  public bool IgnoreEos = false;
  public string[] StopStrings = new string[0];
  public int[] StopTokens = new int[0];
}

internal static class Native {
  const string Lib = "dsrt";
  public const uint ApiVersion = (0u << 16) | 1u;

  [StructLayout(LayoutKind.Sequential)]
  public struct ModelParams {
    public uint struct_size;
    public int backend, n_threads, validate_scales, load_mtp;
    public IntPtr progress_fn, progress_user_data, cancel;
    public int tokenizer_only, use_mmap;
    public IntPtr devices;
    public int n_devices;
    public ulong device_memory;
    public float device_memory_fraction;
    public int experts_compute;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct ModelInfo {
    public uint struct_size;
    public int n_vocab, n_embd, n_layers, n_heads, n_routed_experts, n_experts_per_tok, n_mtp_layers, n_ctx_train,
        weights_format, backend, bos_token_id, eos_token_id;
    public ulong n_params, weight_bytes;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct EngineParams {
    public uint struct_size;
    public int max_tokens, max_batch_tokens, attention, precision;
    public float kv_memory_fraction;
    public int mtp_drafts, tp, ep, dp_attention;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct EngineStats {
    public uint struct_size;
    public int n_sessions, kv_pages_used, kv_pages_total, kv_page_tokens;
    public ulong n_steps, n_tokens, max_batch_seqs;
    public double forward_seconds;
    public ulong mtp_drafted, mtp_accepted;
    public double device_seconds;
    public ulong graph_replays, graph_captures;
    public ulong expert_hits, expert_misses, expert_bytes_copied, expert_bytes_read_in_host;
    public ulong experts_on_cpu, expert_bytes_cpu;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct SessionParams {
    public uint struct_size;
    public int max_ctx, logits_all;
    public ulong seed;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct SamplingParams {
    public uint struct_size;
    public float temperature;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct SessionStats {
    public uint struct_size;
    public int n_tokens, n_pending, n_pages;
    public ulong n_evaluated;
    public int prompt_tokens, reused_tokens, generated_tokens;
    public double ttft_seconds, decode_tokens_per_second;
    public int mtp_drafted, mtp_accepted;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct GenParamsC {
    public uint struct_size;
    public int max_new_tokens;
    public float temperature;
    public int top_k;
    public float top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    public int penalty_window, has_seed;
    public ulong seed;
    public int ignore_eos, skip_special;
    public IntPtr stop_tokens;
    public UIntPtr n_stop_tokens;
    public IntPtr stop_strings;
    public UIntPtr n_stop_strings;
    public IntPtr logit_bias_tokens, logit_bias_values;
    public UIntPtr n_logit_bias;
    public IntPtr cancel;
  }
  [StructLayout(LayoutKind.Sequential)]
  public struct EventC {
    public uint struct_size;
    public int type, token;
    public IntPtr text;
    public UIntPtr text_len;
    public int finish_reason, status, n_generated;
  }

  [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
  public delegate int EventFn(IntPtr ev, IntPtr user);

  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern uint dsrt_api_version();
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_check_version(uint v);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr dsrt_version_string();
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr dsrt_last_error();
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_free(IntPtr p);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern UIntPtr dsrt_struct_size(int id);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_cancel_create(out IntPtr c);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_cancel_trigger(IntPtr c);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_cancel_free(IntPtr c);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_model_params_init(ref ModelParams p, UIntPtr size);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_model_load(byte[] dir, ref ModelParams p, out IntPtr m);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_model_free(IntPtr m);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_model_info_get(ModelHandle m, ref ModelInfo i);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_tokenize(ModelHandle m, byte[] text, UIntPtr len, int flags, int[] ids, UIntPtr cap, out UIntPtr n);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_detokenize(ModelHandle m, int[] ids, UIntPtr n, int flags, byte[] buf, UIntPtr cap, out UIntPtr nOut);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_chat_apply(ModelHandle m, byte[] msgs, IntPtr tools, IntPtr kwargs, int flags, out IntPtr prompt);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_engine_params_init(ref EngineParams p, UIntPtr size);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_engine_create(ModelHandle m, ref EngineParams p, out IntPtr e);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_engine_free(IntPtr e);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_create(EngineHandle e, IntPtr p, out IntPtr s);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_session_free(IntPtr s);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_append_tokens(SessionHandle s, int[] t, UIntPtr n);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_append_text(SessionHandle s, byte[] t, UIntPtr n, int flags);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_append_chat(SessionHandle s, byte[] msgs, IntPtr tools, int flags);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_eval(SessionHandle s, IntPtr cancel);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_sample(SessionHandle s, IntPtr p, out int tok);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_stats_get(SessionHandle s, ref SessionStats st);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void dsrt_gen_params_init(ref GenParamsC p, UIntPtr size, ModelHandle m);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl, EntryPoint = "dsrt_gen_params_init")]
  public static extern void dsrt_gen_params_init_plain(ref GenParamsC p, UIntPtr size, IntPtr m);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_start(SessionHandle s, ref GenParamsC p);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_next(SessionHandle s, ref EventC ev);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_generate(SessionHandle s, ref GenParamsC p, EventFn fn, IntPtr user);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_state_save(SessionHandle s, out IntPtr buf, out UIntPtr n);
  [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern int dsrt_session_state_load(SessionHandle s, byte[] buf, UIntPtr n);

  public static byte[] Utf8z(string s) {
    var b = Encoding.UTF8.GetBytes(s);
    var z = new byte[b.Length + 1];
    Array.Copy(b, z, b.Length);
    return z;
  }
  public static string FromUtf8(IntPtr p, int len) {
    if (p == IntPtr.Zero || len == 0) return "";
    var b = new byte[len];
    Marshal.Copy(p, b, 0, len);
    return Encoding.UTF8.GetString(b);
  }
  public static string FromUtf8z(IntPtr p) {
    if (p == IntPtr.Zero) return "";
    int n = 0;
    while (Marshal.ReadByte(p, n) != 0) n++;
    return FromUtf8(p, n);
  }
  public static void Check(int st) {
    if (st != 0) throw new DsrtException(st, FromUtf8z(dsrt_last_error()));
  }
}

public abstract class DsrtHandle : SafeHandle {
  protected DsrtHandle() : base(IntPtr.Zero, true) {}
  public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
  internal void Set(IntPtr p) { SetHandle(p); }
}
public sealed class ModelHandle : DsrtHandle {
  protected override bool ReleaseHandle() { Native.dsrt_model_free(handle); return true; }
}
public sealed class EngineHandle : DsrtHandle {
  protected override bool ReleaseHandle() { Native.dsrt_engine_free(handle); return true; }
}
public sealed class SessionHandle : DsrtHandle {
  protected override bool ReleaseHandle() { Native.dsrt_session_free(handle); return true; }
}
public sealed class CancelHandle : DsrtHandle {
  protected override bool ReleaseHandle() { Native.dsrt_cancel_free(handle); return true; }
}

public static class Library {
  public static string Version { get { return Native.FromUtf8z(Native.dsrt_version_string()); } }
  // Also the first call into libdsrt: a missing native library becomes a DsrtException that says where it is
  // looked for, instead of a bare DllNotFoundException.
  public static void CheckVersion() {
    int st;
    try {
      st = Native.dsrt_check_version(Native.ApiVersion);
    } catch (DllNotFoundException e) {
      throw new DsrtException(-1, "the native library libdsrt.so was not found (" + e.Message + "). Install dsrt " +
          "(cmake --install build; then ldconfig for /usr/local), or run with LD_LIBRARY_PATH set to the folder " +
          "holding libdsrt.so (the CMake build folder).");
    }
    Native.Check(st);
  }
  public static int StructSize(int id) { return (int)Native.dsrt_struct_size(id); }
  // This binding's layouts, to compare with StructSize.
  public static int BindingStructSize(int id) {
    switch (id) {
      case 1: return Marshal.SizeOf(typeof(Native.ModelParams));
      case 2: return Marshal.SizeOf(typeof(Native.ModelInfo));
      case 3: return Marshal.SizeOf(typeof(Native.EngineParams));
      case 4: return Marshal.SizeOf(typeof(Native.EngineStats));
      case 5: return Marshal.SizeOf(typeof(Native.SessionParams));
      case 6: return Marshal.SizeOf(typeof(Native.SamplingParams));
      case 7: return Marshal.SizeOf(typeof(Native.SessionStats));
      case 8: return Marshal.SizeOf(typeof(Native.GenParamsC));
      case 9: return Marshal.SizeOf(typeof(Native.EventC));
      default: return 0;
    }
  }
}

public sealed class CancelToken : IDisposable {
  internal readonly CancelHandle Handle = new CancelHandle();
  public CancelToken() {
    IntPtr p;
    Native.Check(Native.dsrt_cancel_create(out p));
    Handle.Set(p);
  }
  public void Trigger() { Native.dsrt_cancel_trigger(Handle.DangerousGetHandle()); }
  public void Dispose() { Handle.Dispose(); }
}

public sealed class Model : IDisposable {
  internal readonly ModelHandle Handle = new ModelHandle();
  public Model(string dir, int threads = 0, bool tokenizerOnly = false) {
    var p = new Native.ModelParams();
    Native.dsrt_model_params_init(ref p, (UIntPtr)Marshal.SizeOf(typeof(Native.ModelParams)));
    p.n_threads = threads;
    p.tokenizer_only = tokenizerOnly ? 1 : 0;
    IntPtr m;
    Native.Check(Native.dsrt_model_load(Native.Utf8z(dir), ref p, out m));
    Handle.Set(m);
  }
  public int VocabSize {
    get {
      var i = new Native.ModelInfo();
      i.struct_size = (uint)Marshal.SizeOf(typeof(Native.ModelInfo));
      Native.Check(Native.dsrt_model_info_get(Handle, ref i));
      return i.n_vocab;
    }
  }
  public int[] Tokenize(string text, bool addSpecial = false, bool parseSpecial = true) {
    var b = Encoding.UTF8.GetBytes(text);
    var ids = new int[b.Length + 8];
    UIntPtr n;
    int flags = (addSpecial ? 1 : 0) | (parseSpecial ? 2 : 0);
    Native.Check(Native.dsrt_tokenize(Handle, b, (UIntPtr)b.Length, flags, ids, (UIntPtr)ids.Length, out n));
    Array.Resize(ref ids, (int)n);
    return ids;
  }
  public byte[] Detokenize(int[] ids, bool skipSpecial = false) {
    UIntPtr n;
    int flags = skipSpecial ? 1 : 0;
    int st = Native.dsrt_detokenize(Handle, ids, (UIntPtr)ids.Length, flags, null, UIntPtr.Zero, out n);
    if (st != 0 && st != 8) Native.Check(st);
    var buf = new byte[(int)n];
    Native.Check(Native.dsrt_detokenize(Handle, ids, (UIntPtr)ids.Length, flags, buf, (UIntPtr)buf.Length, out n));
    return buf;
  }
  public string ChatApply(string messagesJson, bool addGenerationPrompt = true) {
    IntPtr p;
    Native.Check(Native.dsrt_chat_apply(Handle, Native.Utf8z(messagesJson), IntPtr.Zero, IntPtr.Zero, addGenerationPrompt ? 1 : 0, out p));
    string s = Native.FromUtf8z(p);
    Native.dsrt_free(p);
    return s;
  }
  public GenParams DefaultGenParams() {
    var c = new Native.GenParamsC();
    Native.dsrt_gen_params_init(ref c, (UIntPtr)Marshal.SizeOf(typeof(Native.GenParamsC)), Handle);
    return new GenParams { MaxNewTokens = c.max_new_tokens, Temperature = c.temperature, TopK = c.top_k, TopP = c.top_p, MinP = c.min_p };
  }
  public void Dispose() { Handle.Dispose(); }
}

public sealed class Engine : IDisposable {
  internal readonly EngineHandle Handle = new EngineHandle();
  // mtpDrafts: 1-4 turns on speculative decoding with the model's MTP module (same output, fewer steps).
  public Engine(Model model, int maxTokens = 0, int mtpDrafts = 0) {
    var p = new Native.EngineParams();
    Native.dsrt_engine_params_init(ref p, (UIntPtr)Marshal.SizeOf(typeof(Native.EngineParams)));
    p.max_tokens = maxTokens;
    p.mtp_drafts = mtpDrafts;
    IntPtr e;
    Native.Check(Native.dsrt_engine_create(model.Handle, ref p, out e));
    Handle.Set(e);
  }
  public void Dispose() { Handle.Dispose(); }
}

// The C view of GenParams; owns unmanaged copies of its strings and arrays until disposed.
internal sealed class GenScope : IDisposable {
  public Native.GenParamsC C;
  readonly List<IntPtr> owned = new List<IntPtr>();
  public GenScope(GenParams p, CancelToken cancel) {
    C = new Native.GenParamsC();
    Native.dsrt_gen_params_init_plain(ref C, (UIntPtr)Marshal.SizeOf(typeof(Native.GenParamsC)), IntPtr.Zero);
    C.max_new_tokens = p.MaxNewTokens;
    C.temperature = p.Temperature;
    C.top_k = p.TopK;
    C.top_p = p.TopP > 0 ? p.TopP : 1f;
    C.min_p = p.MinP;
    if (p.Seed.HasValue) { C.has_seed = 1; C.seed = p.Seed.Value; }
    C.ignore_eos = p.IgnoreEos ? 1 : 0;
    if (p.StopStrings.Length > 0) {
      IntPtr arr = Marshal.AllocHGlobal(IntPtr.Size * p.StopStrings.Length);
      owned.Add(arr);
      for (int i = 0; i < p.StopStrings.Length; i++) {
        byte[] z = Native.Utf8z(p.StopStrings[i]);
        IntPtr s = Marshal.AllocHGlobal(z.Length);
        Marshal.Copy(z, 0, s, z.Length);
        owned.Add(s);
        Marshal.WriteIntPtr(arr, i * IntPtr.Size, s);
      }
      C.stop_strings = arr;
      C.n_stop_strings = (UIntPtr)p.StopStrings.Length;
    }
    if (p.StopTokens.Length > 0) {
      IntPtr arr = Marshal.AllocHGlobal(4 * p.StopTokens.Length);
      owned.Add(arr);
      Marshal.Copy(p.StopTokens, 0, arr, p.StopTokens.Length);
      C.stop_tokens = arr;
      C.n_stop_tokens = (UIntPtr)p.StopTokens.Length;
    }
    if (cancel != null) C.cancel = cancel.Handle.DangerousGetHandle();
  }
  public void Dispose() { foreach (var p in owned) Marshal.FreeHGlobal(p); owned.Clear(); }
}

public sealed class Session : IDisposable {
  internal readonly SessionHandle Handle = new SessionHandle();
  Native.EventFn keepAlive;  // the delegate the library may call during Generate

  public Session(Engine engine) {
    IntPtr s;
    Native.Check(Native.dsrt_session_create(engine.Handle, IntPtr.Zero, out s));
    Handle.Set(s);
  }
  public void AppendTokens(int[] ids) { Native.Check(Native.dsrt_session_append_tokens(Handle, ids, (UIntPtr)ids.Length)); }
  public void AppendText(string text, bool addSpecial = true) {
    var b = Encoding.UTF8.GetBytes(text);
    Native.Check(Native.dsrt_session_append_text(Handle, b, (UIntPtr)b.Length, 2 | (addSpecial ? 1 : 0)));
  }
  public void AppendChat(string messagesJson, bool addGenerationPrompt = true) {
    Native.Check(Native.dsrt_session_append_chat(Handle, Native.Utf8z(messagesJson), IntPtr.Zero, addGenerationPrompt ? 1 : 0));
  }
  public void Eval() { Native.Check(Native.dsrt_session_eval(Handle, IntPtr.Zero)); }
  public int SampleGreedy() {
    int t;
    Native.Check(Native.dsrt_session_sample(Handle, IntPtr.Zero, out t));
    return t;
  }
  public byte[] SaveState() {
    IntPtr buf;
    UIntPtr n;
    Native.Check(Native.dsrt_session_state_save(Handle, out buf, out n));
    var b = new byte[(int)n];
    Marshal.Copy(buf, b, 0, b.Length);
    Native.dsrt_free(buf);
    return b;
  }
  public void LoadState(byte[] blob) { Native.Check(Native.dsrt_session_state_load(Handle, blob, (UIntPtr)blob.Length)); }

  static Event ToEvent(ref Native.EventC ev) {
    return new Event { Token = ev.token, Text = Native.FromUtf8(ev.text, (int)ev.text_len), Done = ev.type == 2,
                       Finish = (Finish)ev.finish_reason };
  }

  // Pull: iterates the turn's events; the CancellationToken ends the turn as Cancelled.
  public IEnumerable<Event> Stream(GenParams p, CancellationToken ct = default(CancellationToken)) {
    using (var cancel = new CancelToken())
    using (ct.Register(cancel.Trigger))
    using (var scope = new GenScope(p, cancel)) {
      Native.Check(Native.dsrt_session_start(Handle, ref scope.C));
      for (;;) {
        var ev = new Native.EventC();
        ev.struct_size = (uint)Marshal.SizeOf(typeof(Native.EventC));
        Native.Check(Native.dsrt_session_next(Handle, ref ev));
        var e = ToEvent(ref ev);
        yield return e;
        if (e.Done) yield break;
      }
    }
  }

  // Push: calls onEvent for every event on this thread; return false to stop.
  public void Generate(GenParams p, Func<Event, bool> onEvent, CancellationToken ct = default(CancellationToken)) {
    using (var cancel = new CancelToken())
    using (ct.Register(cancel.Trigger))
    using (var scope = new GenScope(p, cancel)) {
      Exception failure = null;
      keepAlive = (evp, user) => {
        try {
          var ev = (Native.EventC)Marshal.PtrToStructure(evp, typeof(Native.EventC));
          return onEvent(ToEvent(ref ev)) ? 0 : 1;
        } catch (Exception ex) {  // never unwind into native code
          failure = ex;
          return 1;
        }
      };
      int st = Native.dsrt_session_generate(Handle, ref scope.C, keepAlive, IntPtr.Zero);
      GC.KeepAlive(keepAlive);
      keepAlive = null;
      if (failure != null) throw failure;
      Native.Check(st);
    }
  }
  public void Dispose() { Handle.Dispose(); }
}

}  // namespace Dsrt
